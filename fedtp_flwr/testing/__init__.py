"""Test and benchmark support, not shipped in the FAB: `flower_harness` starts real Flower processes (local
SuperLink, SuperNodes, TLS, node auth) and stops them; `inprocess` delivers messages to the client code in the
same process."""
