"""One module per model family; importing a family registers its models in `zoo.registry`."""
