"""TensorBoard output of a run: scalars, the resolved config as text, and an HPARAMS session.

The HParams dashboard lists a run when its event files hold three plugin summaries: the
experiment (which hyperparameters and metric tags exist), the session start (this run's values)
and the session end (its status). torch's ``add_hparams`` writes them into a new sub-folder and
always says "success"; we write them into the run's own ``tb/`` folder, next to the scalars they
refer to, with the real status (a pruned or failed sweep trial shows as such).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

_PLUGIN = "hparams"
_STATUS = {
    "success": api_pb2.Status.Value("STATUS_SUCCESS"),
    "failure": api_pb2.Status.Value("STATUS_FAILURE"),
    "running": api_pb2.Status.Value("STATUS_RUNNING"),
    "unknown": api_pb2.Status.Value("STATUS_UNKNOWN"),
}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists and None become strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    data.version = 0
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=_PLUGIN, content=data.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _hparam_value(value: Any) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float):
        return struct_pb2.Value(number_value=float(value))
    return struct_pb2.Value(string_value=str(value))


def _hparam_type(value: Any) -> int:
    if isinstance(value, bool):
        return api_pb2.DataType.Value("DATA_TYPE_BOOL")
    if isinstance(value, int | float):
        return api_pb2.DataType.Value("DATA_TYPE_FLOAT64")
    return api_pb2.DataType.Value("DATA_TYPE_STRING")


def _hparam_info(name: str, example: Any, differs: bool, domain: Sequence[Any] | None):
    info = api_pb2.HParamInfo(name=name, type=_hparam_type(example), differs=differs)
    if domain is not None:
        info.domain_discrete.values.extend([_hparam_value(v) for v in domain])
    return info


def experiment_summary(
    hparams: Mapping[str, Any],
    metric_tags: list[str],
    *,
    differs: Collection[str] = (),
    discrete: Mapping[str, Sequence[Any]] | None = None,
) -> Summary:
    """The HParams dashboard's columns. It sorts hparams by (not ``differs``, name) and shows the
    first five, and the first five metrics in this order; an hparam with a ``discrete`` domain
    (under 10 values) gets a checkbox filter."""
    discrete = discrete or {}
    experiment = api_pb2.Experiment(
        hparam_infos=[
            _hparam_info(k, v, k in differs, discrete.get(k)) for k, v in hparams.items()
        ],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags],
    )
    return _plugin_summary(
        "_hparams_/experiment", plugin_data_pb2.HParamsPluginData(experiment=experiment)
    )


def session_start_summary(hparams: Mapping[str, Any], group: str = "") -> Summary:
    start = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for key, value in hparams.items():
        start.hparams[key].CopyFrom(_hparam_value(value))
    return _plugin_summary(
        "_hparams_/session_start_info", plugin_data_pb2.HParamsPluginData(session_start_info=start)
    )


def session_end_summary(status: str) -> Summary:
    end = plugin_data_pb2.SessionEndInfo(status=_STATUS[status], end_time_secs=time.time())
    return _plugin_summary(
        "_hparams_/session_end_info", plugin_data_pb2.HParamsPluginData(session_end_info=end)
    )


_file_numbers = itertools.count()


class EventFile:
    """One TensorBoard event file, written on the calling thread.

    TensorBoard's own writer hands each event to a background thread. A run writes a few small
    events per epoch and flushes at every checkpoint (so a resume can purge exactly what came
    after it): waking that thread and waiting for it there cost more than the writes. This
    offers the methods ``SummaryWriter`` calls on its file writer.
    """

    def __init__(self, log_dir: str, filename_suffix: str = ""):
        os.makedirs(log_dir, exist_ok=True)
        # ".engine": TensorBoard's writer numbers its files per process too, and one of its
        # files in the same folder and second would otherwise get this name.
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_file_numbers)}.engine{filename_suffix}"
        )
        self._log_dir = log_dir
        self._file = open(os.path.join(log_dir, name), "wb")  # noqa: SIM115 (closed in close)
        self._records = RecordWriter(self._file)
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def get_logdir(self) -> str:
        return self._log_dir

    def add_event(self, event: Event, step: int | None = None, walltime: float | None = None):
        event.wall_time = time.time() if walltime is None else walltime
        if step is not None:
            event.step = int(step)
        self._records.write(event.SerializeToString())

    def add_summary(self, summary: Summary, global_step=None, walltime=None) -> None:
        self.add_event(Event(summary=summary), global_step, walltime)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def reopen(self) -> None:
        pass  # SummaryWriter makes a new file writer after close


class _SummaryWriter(SummaryWriter):
    """torch's SummaryWriter (images, text, ...) over a synchronous ``EventFile``."""

    def _get_file_writer(self):
        if self.all_writers is None or self.file_writer is None:
            self.file_writer = EventFile(self.log_dir, self.filename_suffix)
            self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
            if self.purge_step is not None:
                # TensorBoard drops every event of this run at or after a START session log's
                # step: what an interrupted attempt wrote after its last checkpoint.
                start = SessionLog(status=SessionLog.START)
                self.file_writer.add_event(Event(session_log=start), self.purge_step)
                self.purge_step = None
        return self.file_writer


class TBLogger:
    """The run's TensorBoard writer. ``purge_step`` drops, in TensorBoard's view, everything an
    interrupted earlier attempt logged at or after that step, so a resumed curve has no duplicates."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.writer = _SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """All values as one event (one record instead of one per tag: cheaper per epoch)."""
        summary = Summary(
            value=[
                Summary.Value(tag=tag, simple_value=float(value))
                for tag, value in values.items()
                if value is not None and not math.isnan(value)
            ]
        )
        if summary.value:
            self.writer._get_file_writer().add_summary(summary, step)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, step)

    def hparams_start(
        self, hparams: Mapping[str, Any], metric_tags: list[str], group: str = ""
    ) -> None:
        fw = self.writer._get_file_writer()
        fw.add_summary(experiment_summary(hparams, metric_tags))
        fw.add_summary(session_start_summary(hparams, group))

    def hparams_end(self, status: str) -> None:
        self.writer._get_file_writer().add_summary(session_end_summary(status))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NullLogger:
    """What ranks other than 0 log to under DDP: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
