"""Built-in storage and clock plugins."""
