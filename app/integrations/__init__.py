"""Privacy-request platforms that drive Palimpsest (Fides): their callbacks, stored with
the request and sent when it ends."""
