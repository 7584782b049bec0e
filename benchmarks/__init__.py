"""Side-by-side measurements of pf-proxy against socat and the kernel (never pass/fail)."""
