"""``privatune audit``: check site and server ledgers without trusting anyone's arithmetic.

For every ledger file given (or found under a folder: ``*.ledger.sqlite``, i.e. ``site-<id>.ledger.sqlite`` and
``server.ledger.sqlite``) the audit

1. verifies the file (``privatune.common.ledger.verify``): a file that is not a ledger or whose pages or structure are
   damaged is ``unreadable``; a malformed row (wrong type, invalid text, NULL) is ``chain-malformed``; an edited,
   deleted, inserted or moved row of any chained table is a violation naming the table and row. A bad ledger
   never stops the audit: the other files are audited, and only well-formed rows are accounted;
2. recomputes every epsilon from the recorded mechanisms alone, with both Opacus accountants (RDP and PRV) and,
   independently of Opacus, with Google dp-accounting's PLD:
   a site row that names a cohort (the exact set of keyed record ids it sampled from) gets the epsilon of the
   worst record of that cohort, composing every earlier spend whose cohort holds that record (this run's for the
   run epsilon, all runs' for the budget); a row from before cohorts gets, as before, its run's rows and every row
   on its dataset fingerprint up to it; a server report's epsilon comes from that client's trained reports in the
   run up to it;
3. flags a recorded epsilon below the recomputation (with the accountant the row names, beyond ``tolerance``), a
   recorded epsilon below the independent recomputation (PLD; Opacus' PRV for rows accounted with PLD) by more
   than the accountants' own error (``INDEPENDENT_REL_TOLERANCE``), a
   record (or, before cohorts, a dataset) above the site budget in force, and a cohort row that does not match its
   id or a spend naming a cohort the ledger lacks;
4. cross-checks the server's record against the sites': a round the server has as trained for a client but the
   client's ledger lacks (or the reverse), and any reported value that differs from the site's record.
5. recomputes each private-selection record beside a site ledger (``site-<id>.selections.sqlite``, written by
   ``privatune tune --privacy select``) from that site ledger's spends: :mod:`.selection`.

A report is ``ok`` only without violations; notes (e.g. a client whose ledger was not among the paths, or a spend
the site recorded whose reply never reached the server) are informative and do not fail the audit.

The modules, in the order an audit runs them: :mod:`.inputs` (finding and opening ledgers), :mod:`.checks` (each
ledger: chains, cohorts, epsilons, budgets) with :mod:`.recompute` (the independent epsilons), :mod:`.cross_check`
(server against sites), :mod:`.selection` (private-selection records), :mod:`.summary` (the report); :mod:`.auditor` runs them. :mod:`.report` is the report's
data; :mod:`.render` and :mod:`.plots` present it and decide nothing.
"""

from privatune.common.audit.auditor import audit_paths
from privatune.common.audit.inputs import AuditInputError, find_ledgers
from privatune.common.audit.plots import PLOT_NAME
from privatune.common.audit.render import (
    JSON_NAME,
    MARKDOWN_NAME,
    ReportFiles,
    json_text,
    render_table,
    render_violations,
    report_to_json,
    write_report,
)
from privatune.common.audit.report import (
    SEEDED_FLAG,
    SERVER,
    SITE,
    VIOLATION_KINDS,
    AuditEntry,
    AuditReport,
    LedgerFileInfo,
    PartySummary,
    Violation,
)

__all__ = [
    "JSON_NAME",
    "MARKDOWN_NAME",
    "PLOT_NAME",
    "SEEDED_FLAG",
    "SERVER",
    "SITE",
    "VIOLATION_KINDS",
    "AuditEntry",
    "AuditInputError",
    "AuditReport",
    "LedgerFileInfo",
    "PartySummary",
    "ReportFiles",
    "Violation",
    "audit_paths",
    "find_ledgers",
    "json_text",
    "render_table",
    "render_violations",
    "report_to_json",
    "write_report",
]
