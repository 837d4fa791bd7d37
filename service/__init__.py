"""The HTTP gateway and command line of imagetag: everything but the models."""
