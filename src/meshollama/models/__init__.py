"""Models over the mesh: manifests, on-disk stores, the blob protocol, pulls and replication.

* :mod:`.manifest`: Ollama's manifest format (what a model is: sha256-addressed blobs).
* :mod:`.store`: the :class:`~.store.Store` protocol; :mod:`.ollama_dir` (Ollama's
  models directory) and :mod:`.embedded_dir` (the embedded engine's ``model_dir``).
* :mod:`.wire`, :mod:`.blob_server`, :mod:`.blob_client`: ``/meshollama/blob/1``.
* :mod:`.plan` (sans-IO piece scheduler), :mod:`.pull` (a pull, with Ollama's progress lines).
* :mod:`.placement`, :mod:`.replicator`: copy counts by rendezvous hashing.
"""
