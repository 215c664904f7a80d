"""Model builders and offline loaders."""
