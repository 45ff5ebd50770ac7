"""The demo and the tiny local models it (and the tests) use."""
