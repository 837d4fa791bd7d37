"""The models: detector, classifier, fusion, and the clients that run them. No web framework."""
