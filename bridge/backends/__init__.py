"""Where sessions run: the backend contract (base.py) and its implementations. Only the modules of
this package import the docker SDK."""
