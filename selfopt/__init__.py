"""selfopt: learned optimizers that train themselves."""
