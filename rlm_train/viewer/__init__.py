"""`rlm-train view`: trajectories as one self-contained HTML page.

    rlm-train view runs/gen -o runs/gen/view.html          # a generate run directory
    rlm-train view runs/demo/trajectory.jsonl -o view.html  # one trajectory file
    rlm-train view runs/eval -o runs/eval/view.html         # a directory of run directories: one method each

The page needs no network: the episodes are embedded as JSON, the list is rendered
virtually and an episode is parsed only when it is opened (load.py reads, page.py
writes, assets/ holds the page's HTML, CSS and JavaScript).

The page's URL fragment holds its filters, so other pages can link to a slice of it:

    view.html#method=M&family=F&outcome=O&score=S&error=E&q=TEXT&sort=KEY&desc=1&ep=ID

Every key is optional; each value is percent-encoded (encodeURIComponent,
`page.fragment()` in Python) and matched exactly:

- `method`: a method name (`rlm-train eval`'s OUT/runs/METHOD/ is METHOD);
- `family`: a task family (`-` for episodes without one, as the eval report writes it);
- `outcome`: final, max_iterations, budget_exhausted or error;
- `score`: 1, 0, partial (0 < s < 1), none (unscored), or >=X, >X, <=X, <X;
- `error`: none, any, or one error kind: model / sandbox / internal (the episode's),
  cell:timeout / cell:limit / cell:sandbox, exception, parse, subcall, score, forced;
- `q`: a case-insensitive substring of id, task, method, family, query or answer;
- `sort`: method, family, task, id, score, outcome, errors, turns, subcalls, tokens,
  wall or query (`desc=1` reverses it);
- `ep`: the id of the episode to open.
"""

from rlm_train.viewer.page import FRAGMENT_KEYS, build_html, fragment

__all__ = ["FRAGMENT_KEYS", "build_html", "fragment"]
