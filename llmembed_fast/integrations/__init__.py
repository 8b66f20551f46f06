"""Drop-in acceleration of other libraries (imported on use, so their packages stay optional).

``llmembed_fast.integrations.sentence_transformers.accelerate(model)``: the fused head in a
sentence-transformers model's Pooling/Normalize, in place.
"""
