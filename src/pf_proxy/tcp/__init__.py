"""The TCP data plane: the five pf-proxy commands' relay, and the explicit proxy
(vsock-to-ip-proxy), over one set of endpoints.

`dstheader`, `sniff`, `explicit`, `access` are pure; `origdst` is the one Linux NAT lookup;
`relay` is the hot loop; `routes` says where each command's connections go; `engine` accepts
and handles them.
"""
