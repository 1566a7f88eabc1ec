"""The fault suite: no request through the mesh is lost or hung, whatever fails underneath.

* ``fates``: what happened to each request, seen from the client (complete,
  explicit error, hung, silently truncated), and a tally for load runs;
* ``test_fates``: ``fates.classify`` against literal bodies of every format;
* ``test_fake_continuation``: the stand-in Ollama's ``text``,
  continuation and ``stall_after_n_chunks`` knobs the fault tests rely on;
* ``test_client_gone``: real ``meshollama start`` processes; a client that
  leaves mid-stream cancels the work on the serving peer.
"""
