"""The Flower ``ClientApp``: one SuperNode is one client of the federation (its work: :mod:`.client`).

Replies: ``train`` sends the method's upload (HyperFL: the hypernetwork
arrays; ``local``: none; pFedHN: the change of the weights it received) and a
MetricRecord (``num-examples``, which weights the server's average, and
``partition-id``; the figures too with client-metrics, see
:func:`~.client.replied_metrics`); when its config says ``evaluate-received``
(the server folds evaluation into training), first the test accuracy with what
it received, before training on it; ``evaluate`` sends the client's test
accuracy with what the server sent after aggregating; ``query`` says which
partition the node holds, of how many (the server sends pFedHN's nodes the
weights generated for their partition, and stops a run whose clients differ
from num-partitions).  With secure aggregation the train messages are the
SecAgg+ protocol's (:func:`~.secure_aggregation.secure_aggregation_mod`).

Flower starts a process per message, and this module is what it imports: the
handlers import torch and the package's training code (:mod:`.client`) only
when a message needs them, so a process that answers a query or relays SecAgg+
key shares starts in a fraction of the time.
"""
from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .secure_aggregation import secure_aggregation_mod
from .settings import node_partition

app = ClientApp(mods=[secure_aggregation_mod])  # secure-aggregation: Flower's SecAgg+; other messages pass through


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Receive the global state, train, reply with the upload and the figures."""
    from .client import train_reply

    return train_reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reply with the client's test accuracy under the new global state."""
    from .client import evaluate_reply

    return evaluate_reply(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client) this node holds, of how many: a server that sends every client
    its own weights (pFedHN) addresses its messages by it, and a run whose clients differ from num-partitions
    stops at once."""
    partition_id, partitions = node_partition(context)
    return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": partition_id,
                                                                "num-partitions": partitions})}), reply_to=msg)
