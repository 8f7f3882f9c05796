"""The conformance corpus's PROVENANCE.tsv as test cases.

`noted_files(prefix)` lists the files whose local_path starts with `prefix`, in the table's
order, each with its note parsed into a dict: the note's `key=value` parts, separated by `;`,
leaving out the parts that start with `lxml-xsd`.
"""

from __future__ import annotations

import csv

from tests.conftest import CONFORMANCE


def noted_files(prefix: str) -> list[tuple[str, dict[str, str]]]:
    """(local_path, note as a dict) of each PROVENANCE.tsv row under `prefix`."""
    out: list[tuple[str, dict[str, str]]] = []
    with (CONFORMANCE / "PROVENANCE.tsv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if not row["local_path"].startswith(prefix):
                continue
            note = dict(part.strip().split("=", 1) for part in row["note"].split(";")
                        if "=" in part and not part.strip().startswith("lxml-xsd"))
            out.append((row["local_path"], note))
    return out
