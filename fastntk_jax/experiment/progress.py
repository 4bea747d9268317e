"""Progress of a run: a tqdm bar per stage, and TensorBoard scalars of the per-epoch loss."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)


class Progress:
  """A tqdm bar per stage, plus TensorBoard scalars of the per-epoch loss.

  The event file (`workdir/tb/events.out.tfevents.*`) is written through the `tensorboard`
  package's own `tensorboard.summary.Writer`, with no TensorFlow: its `DirectoryOutput` opens
  files through `tensorboard.compat.tf`, which imports TensorFlow whenever it is installed
  (seconds, and TF's log chatter), so the records go to a plain file here (`_event_output`).
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.writer = None
    try:
      from tensorboard.summary import Writer  # pylint: disable=g-import-not-at-top
      self.writer = Writer(self._event_output(os.path.join(workdir, "tb")))
    except Exception as e:  # TensorBoard logging is a convenience, never a failure
      log.warning("TensorBoard logging disabled: %r", e)

  @staticmethod
  def _event_output(logdir: str):
    """A `tensorboard.summary.Output` writing TFRecord-framed `Event` protos to a new file."""
    # pylint: disable=g-import-not-at-top
    import socket
    import uuid
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary import Output
    from tensorboard.summary.writer.record_writer import RecordWriter
    from tensorboard.util import tensor_util
    # pylint: enable=g-import-not-at-top

    class EventFileOutput(Output):
      """What `DirectoryOutput` writes (same records, same protos), synchronously."""

      def __init__(self):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                                 f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self._records = RecordWriter(open(self.path, "wb"))  # pylint: disable=consider-using-with
        self._records.write(event_pb2.Event(wall_time=time.time(),
                                            file_version="brain.Event:2").SerializeToString())
        self._records.flush()

      def emit_scalar(self, *, plugin_name, tag, data, step, wall_time, tag_metadata=None,
                      description=None):
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name,
                                                               content=tag_metadata),
            summary_description=description,
            data_class=summary_pb2.DataClass.DATA_CLASS_SCALAR)
        event = event_pb2.Event(wall_time=wall_time, step=int(step))
        event.summary.value.add(tag=tag, tensor=tensor_util.make_tensor_proto(data),
                                metadata=metadata)
        self._records.write(event.SerializeToString())

      def flush(self):
        self._records.flush()

      def close(self):
        self._records.close()

    return EventFileOutput()

  def epochs(self, tag: str, total: int) -> Callable[[int, float], None]:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, desc=tag, leave=False, disable=not self.enabled, unit="ep")

    def update(epoch: int, loss: float):
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}")
      if self.writer is not None:
        self.writer.add_scalar(f"{tag}/loss", float(loss), int(epoch))
        self.writer.flush()  # per epoch: a killed run keeps the curve so far
      if epoch + 1 >= total:
        bar.close()

    return update

  def close(self):
    if self.writer is not None:
      self.writer.close()  # flushes
      self.writer = None
