"""The laptop study (``python -m recipes easy_vqa``) in pieces: config, data, model, training on the
engine, measurements, variants, figures, and the study that runs them."""
