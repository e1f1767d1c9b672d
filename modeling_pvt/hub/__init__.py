"""What the Hub sees of a model beside its weights, and the model in other formats: the results schema, model cards,
computed model facts, the conversion of the original checkpoints and the ONNX export. Imports only the model files."""
