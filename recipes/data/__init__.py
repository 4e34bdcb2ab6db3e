"""The data layer every recipe shares: image stores, typed records, transforms, datasets and loaders.

Nothing here knows a model or a task's metric: a task module picks its record type, a model family
gives its transform and tokenizer, and ``ImageTextDataset`` puts them together.
"""
