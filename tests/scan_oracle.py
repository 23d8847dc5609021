"""The dashboard's window scan as it was before it read the error index: one pass over the
``tool_complete``/``iteration`` events with the JSON taken apart by SQLite. The oracle of
``tests/test_health_index.py``: the index-based scan must give what this gives."""
from __future__ import annotations

import logging
import sqlite3
from collections import Counter, defaultdict
from datetime import datetime

from selfheal_plugin.analysis.health import (RunFacts, ToolStats, WindowScan, _epoch_of_jd, _jd,
                                             _norm_type)
from selfheal_plugin.history.connection import last_event_id, scan_id_range
from selfheal_plugin.history.errorindex import MAX_EVENT_BYTES, sane_duration
from selfheal_plugin.history.text import Undecodable

log = logging.getLogger("scan_oracle")
CHUNK_IDS = 200_000

_SCAN_SQL = f"""
SELECT id, run_id, event_type,
  CASE WHEN ok THEN json_extract(event_data, '$.name') END,
  CASE WHEN ok THEN json_extract(event_data, '$.is_error') END,
  CASE WHEN ok THEN json_extract(event_data, '$.error_type') END,
  CASE WHEN ok THEN json_extract(event_data, '$.duration') END,
  CASE WHEN ok THEN json_type(event_data, '$.name') END,
  ok, jd,
  CASE WHEN ok AND json_extract(event_data, '$.is_error') = 1 THEN event_data END
FROM (SELECT id, run_id, event_type, event_data,
             length(CAST(event_data AS BLOB)) <= {MAX_EVENT_BYTES} AND json_valid(event_data) AS ok,
             julianday(timestamp) AS jd
      FROM run_events WHERE id > ? AND id <= ? AND event_type IN ('tool_complete', 'iteration'))
WHERE jd IS NULL OR (jd >= ? AND jd < ?)
ORDER BY id
"""


def scan_events(conn: sqlite3.Connection, start: datetime, end: datetime,
                runs: dict[str, RunFacts] | None = None) -> WindowScan:
    """One streaming pass over the ``tool_complete``/``iteration`` events in [start, end).

    Reads id ranges of :data:`CHUNK_IDS` rows so no read holds the file for long; JSON is
    taken apart by SQLite (``json_extract``); per-tool duration lists are kept only for the
    window (for p95). ``runs`` (facts keyed by run id) collect their tool calls and
    iterations on the way. Malformed rows are counted and skipped.
    """
    top = last_event_id(conn)
    tools: dict[str, ToolStats] = {}
    errors_by_day: dict[int, Counter] = defaultdict(Counter)
    runs = runs if runs is not None else {}
    skipped = 0
    lo_jd, hi_jd = _jd(start), _jd(end)
    mark = 0
    while mark < top:
        hi = min(mark + CHUNK_IDS, top)
        for _id, run_id, etype, name, is_error, error_type, duration, name_type, ok, jd, failed_data in scan_id_range(
                conn, _SCAN_SQL, mark, hi, lo_jd, hi_jd):
            # a failed call's text is read by detection: invalid UTF-8 there makes it malformed, as in the index
            if (jd is None or not ok or isinstance(failed_data, Undecodable) or isinstance(run_id, Undecodable)
                    or not isinstance(run_id, str) or not sane_duration(duration)):  # the index's rules
                skipped += etype == "tool_complete"
                continue
            facts = runs.get(run_id)
            if etype == "iteration":
                if facts is not None:
                    facts.iteration_events += 1
                continue
            if name_type != "text" or not name or isinstance(name, Undecodable):
                skipped += 1
                continue
            st = tools.get(name)
            if st is None:
                st = tools[name] = ToolStats()
            st.calls += 1
            failed = is_error == 1
            if failed:
                st.errors += 1
                norm = _norm_type(error_type)
                st.error_types[norm] += 1
                if norm == "timeout":
                    st.timeouts += 1
                errors_by_day[int(_epoch_of_jd(jd) // 86400)][norm] += 1
            if isinstance(duration, (int, float)) and duration >= 0:
                st.durations.append(duration)
            if facts is not None:
                counts = facts.tool_calls.setdefault(name, [0, 0])
                counts[0] += 1
                counts[1] += failed
        mark = hi
    if skipped:
        log.info("window scan skipped %d malformed tool_complete row(s)", skipped)
    return WindowScan(tools, runs, dict(errors_by_day), skipped)


