"""Driving inference engines: pause/load/verify/resume over HTTP, liveness, per-instance
credentials and the engines' proof of them."""
