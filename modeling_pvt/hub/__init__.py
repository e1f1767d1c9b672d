"""What the Hub sees of a model beside its weights: the results schema, model cards, computed model facts, and the
conversion of the original checkpoints. Imports only the model files."""
