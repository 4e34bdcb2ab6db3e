"""The tasks on the shared engine, one module (or folder) each: vqa, snli_ve, nlvr2, retrieval, easy_vqa."""
