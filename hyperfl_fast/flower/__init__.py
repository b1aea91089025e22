"""HyperFL (and every other method of :mod:`hyperfl_fast.methods`) on Flower: real federations, one process per
client, across machines.  Optional extra: ``pip install hyperfl_fast[flower]``.

- :mod:`.client_app`: the ``ClientApp``. A SuperNode is one client (its work: :mod:`.client`); it trains with
  the same :meth:`~hyperfl_fast.methods.Method.client_update` as the reference engine, keeps its private state
  in ``Context.state`` and in a file of its own (a restart restores it) and replies with the method's upload
  (HyperFL: the hypernetwork), its data size and partition id (its figures only with client-metrics).
- :mod:`.server_app`: the ``ServerApp`` and :class:`~.server_app.UploadAuditingFedAvg`, Flower's ``FedAvg``
  with an upload check and hook, the per-round metrics files and the failure policy.
- :mod:`.secure_aggregation`: Flower's SecAgg+ on both sides (``secure-aggregation = true``): the server
  learns only the weighted mean of the uploads.
- :mod:`.settings`: the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``) as a
  :class:`~hyperfl_fast.config.Config`.

Run it with ``flwr run . <superlink-connection>`` from the repository (see the README).
"""
