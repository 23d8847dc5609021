"""The git side of apply and rollback (GitPython).

* The repository is the one that already holds ``config.toml`` (a dotfiles repository
  where BINKS_HOME is a subdirectory, or where ``config.toml`` is a symlink target), else
  a new one in BINKS_HOME whose ``.gitignore`` keeps everything but the config out (the
  database and its ``-wal``/``-shm``/``-journal`` files above all).
* Commits touch only the config file (``git commit --only -- config.toml``), so whatever
  else a user has staged in a dotfiles repository stays staged and uncommitted.
* Identity is always explicit (``selfheal <selfheal@localhost>``, author and committer):
  GitPython would otherwise use ``root@<host>`` and ``git revert`` would fail when no
  user is configured (DESIGN "Pitfalls: Git identity"). Signing and commit hooks of the
  user's configuration are skipped for our commits.
* A config file with uncommitted edits by its user is never committed or overwritten.
* selfheal's lock and pid files live in ``BINKS_HOME/selfheal/locks/``, whose own
  ``.gitignore`` (``*``) hides the folder from any repository — selfheal's, or a user's
  dotfiles repository holding BINKS_HOME, whose ``.gitignore`` selfheal never touches.
* A failed git command is reported with git's own reason (``Unable to create
  '.git/index.lock': File exists``), on one line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import git

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.text import commit_line

IDENTITY_NAME = "selfheal"
IDENTITY_EMAIL = "selfheal@localhost"
GITIGNORE_MARKER = "# selfheal: this repository versions config.toml only"
GITIGNORE = f"""{GITIGNORE_MARKER}
# (the run history conversations.db and its -wal/-shm/-journal files stay out)
/*
!/.gitignore
!/config.toml
conversations.db
conversations.db-*
conversations.db.selfheal.lock
/selfheal/
"""
TRAILER_IMPROVEMENT = "Self-Heal-Improvement"
TRAILER_PATTERN = "Self-Heal-Pattern"
TRAILER_ACTION = "Self-Heal-Action"


class GitOpsError(SelfHealError):
    """A git state selfheal refuses to work in (dirty config, missing commit, ...)."""


def identity_env() -> dict[str, str]:
    return {"GIT_AUTHOR_NAME": IDENTITY_NAME, "GIT_AUTHOR_EMAIL": IDENTITY_EMAIL,
            "GIT_COMMITTER_NAME": IDENTITY_NAME, "GIT_COMMITTER_EMAIL": IDENTITY_EMAIL}


@dataclass
class ConfigRepo:
    """Where the config file lives in git. ``repo`` is None until :func:`ensure_repo`."""

    config_path: Path  # the path users know (BINKS_HOME/config.toml), maybe a symlink
    real_path: Path  # the file we actually edit
    root: Path  # work tree root (existing repo) or BINKS_HOME (to be created)
    repo: git.Repo | None

    @property
    def rel(self) -> str:
        return self.real_path.relative_to(self.root).as_posix()

    def git(self, *args: str) -> str:
        """Run ``git <args>`` in the work tree with our identity; raises GitOpsError."""
        assert self.repo is not None
        try:
            return self.repo.git.execute(
                ["git", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", *args],
                env=identity_env())
        except git.GitCommandError as exc:
            raise GitOpsError(f"git {args[0]} failed in {self.root}: {git_reason(exc)}") from exc


def git_reason(exc: git.GitCommandError) -> str:
    """git's own reason from a failed command: its first ``fatal:``/``error:`` line (else
    the last line), without GitPython's ``stderr: '…'`` wrapping."""
    text = str(exc.stderr or exc.stdout or "").strip()
    if text.startswith("stderr:"):
        text = text[len("stderr:"):].strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        for prefix in ("fatal:", "error:"):
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    return lines[-1] if lines else f"exit code {exc.status}"


def _resolve(path: Path) -> Path:
    return Path(os.path.realpath(path))


def locate(config_path: Path, home: Path) -> ConfigRepo:
    """Find the repository that holds the config file (without creating anything).

    The file's real path decides (a symlink target in a dotfiles repository is edited and
    committed there). Without a repository, a new one will be made in BINKS_HOME — only
    when the real file is inside BINKS_HOME.
    """
    real = _resolve(config_path)
    probe = real.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        repo = git.Repo(probe, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        repo = None
    if repo is not None and repo.bare:
        repo = None
    if repo is not None:
        root = _resolve(Path(repo.working_tree_dir))
        try:
            real.relative_to(root)
        except ValueError:
            repo = None
    if repo is None:
        home_real = _resolve(home)
        try:
            real.relative_to(home_real)
        except ValueError:
            raise GitOpsError(f"{config_path} points to {real}, which is outside BINKS_HOME and not in a git "
                              "repository; put that file under git first") from None
        return ConfigRepo(config_path, real, home_real, None)
    cr = ConfigRepo(config_path, real, root, repo)
    if repo.ignored(cr.rel):
        raise GitOpsError(f"{cr.rel} is ignored by the git repository at {root}; selfheal only changes a "
                          "config file that git versions (remove it from .gitignore)")
    return cr


def ensure_repo(cr: ConfigRepo) -> ConfigRepo:
    """Create the BINKS_HOME repository when there is none, with a first commit of the
    ``.gitignore`` and the config as it is (so our change is a diff against it).

    Idempotent: a repository we created whose first commit was interrupted gets it now.
    """
    if cr.repo is None:
        cr.root.mkdir(parents=True, exist_ok=True)
        cr.repo = git.Repo.init(cr.root)
    gi = cr.root / ".gitignore"
    if head_sha(cr) is None:
        ours = not gi.exists() or gi.read_text(encoding="utf-8", errors="replace").startswith(GITIGNORE_MARKER)
        if ours:
            if not gi.exists():
                gi.write_text(GITIGNORE, encoding="utf-8")
            paths = [".gitignore"] + ([cr.rel] if cr.real_path.exists() else [])
            cr.git("add", "--", *paths)
            cr.git("commit", "--no-verify", "-q", "-m",
                   "selfheal: start versioning config.toml\n\nThe config as it was before selfheal changed it.",
                   "--", *paths)
    return cr


def head_sha(cr: ConfigRepo) -> str | None:
    if cr.repo is None:
        return None
    try:
        return cr.repo.head.commit.hexsha
    except ValueError:  # no commits yet
        return None


def tracked_in_head(cr: ConfigRepo) -> bool:
    if head_sha(cr) is None:
        return False
    try:
        cr.repo.head.commit.tree / cr.rel
        return True
    except KeyError:
        return False


def check_clean(cr: ConfigRepo) -> None:
    """Refuse a config file with uncommitted edits (modified, staged, deleted, or
    untracked with content in an existing repository)."""
    if cr.repo is None:
        return
    status = cr.git("status", "--porcelain", "--untracked-files=all", "--", cr.rel)
    if not status.strip():
        return
    code = status.splitlines()[0][:2]
    if code == "??":
        text = cr.real_path.read_text(encoding="utf-8", errors="replace") if cr.real_path.is_file() else ""
        if not text.strip():
            return  # an empty untracked file: nothing of the user's to lose
        raise GitOpsError(f"{cr.real_path} is not committed in the git repository at {cr.root}; commit it "
                          "first (git add/commit) so selfheal's change can be reviewed and reverted. "
                          "Nothing was changed.")
    raise GitOpsError(f"{cr.real_path} has uncommitted changes (git status: {code.strip()}); commit or discard "
                      "them first. Nothing was changed.")


def commit_config(cr: ConfigRepo, message: str) -> str:
    """Commit the config file alone; returns the new commit's sha."""
    if cr.real_path.exists():
        cr.git("add", "--", cr.rel)
    cr.git("commit", "--no-verify", "-q", "--only", "-m", message, "--", cr.rel)
    return head_sha(cr)


def file_at(cr: ConfigRepo, rev: str) -> str | None:
    """The config's content at ``rev`` (None when the file is not in that commit)."""
    try:
        blob = cr.repo.commit(rev).tree / cr.rel
    except (KeyError, ValueError, git.BadName):
        return None
    return blob.data_stream.read().decode("utf-8")


def has_commit(cr: ConfigRepo, sha: str) -> bool:
    try:
        cr.repo.commit(sha)
        return True
    except (ValueError, git.BadName):
        return False


def changed_since(cr: ConfigRepo, sha: str) -> bool:
    """Did a commit after ``sha`` (on the current branch) touch the config file?"""
    return bool(cr.git("log", "--format=%H", f"{sha}..HEAD", "--", cr.rel).strip())


def find_commit(cr: ConfigRepo, improvement_id: str, action: str, since: str | None) -> str | None:
    """Our commit for (improvement, action) made after ``since`` (for crash recovery)."""
    if cr.repo is None or head_sha(cr) is None:
        return None
    rng = f"{since}..HEAD" if since else "HEAD"
    out = cr.git("log", "--format=%H%x00%B%x1e", rng, "--", cr.rel)
    for entry in out.split("\x1e"):
        if "\x00" not in entry:
            continue
        sha, body = entry.strip("\n").split("\x00", 1)
        lines = {ln.strip() for ln in body.splitlines()}
        if f"{TRAILER_IMPROVEMENT}: {improvement_id}" in lines and f"{TRAILER_ACTION}: {action}" in lines:
            return sha.strip()
    return None


def revert_no_commit(cr: ConfigRepo, sha: str) -> None:
    """``git revert --no-commit`` of one of our commits (only the config file changes)."""
    try:
        cr.git("revert", "--no-commit", sha)
    except GitOpsError:
        try:
            restore_index_and_file(cr, None)
        except GitOpsError:
            pass  # the revert's own error says why (e.g. a locked index it never touched)
        raise


def index_matches_head(cr: ConfigRepo) -> bool:
    """Is the config's index entry what HEAD has (nothing staged)? Read-only: works while
    another git process holds ``index.lock``."""
    if cr.repo is None:
        return True
    return not cr.git("diff", "--cached", "--name-only", "--", cr.rel).strip()


def end_revert_state(cr: ConfigRepo) -> None:
    """Forget a ``revert --no-commit`` in progress without touching any file."""
    if cr.repo is not None and (Path(cr.repo.git_dir) / "REVERT_HEAD").exists():
        cr.git("revert", "--quit")


def restore_index_and_file(cr: ConfigRepo, text: str | None) -> None:
    """Put the config's index entry back to HEAD and, when ``text`` is given, nothing else
    (the caller writes the file); with ``text`` None the file comes from HEAD too."""
    if cr.repo is None:
        return
    if tracked_in_head(cr):
        cr.git("reset", "-q", "HEAD", "--", cr.rel)
        if text is None:
            cr.git("checkout", "HEAD", "--", cr.rel)
    else:
        cr.git("rm", "-q", "--cached", "--ignore-unmatch", "--", cr.rel)
    end_revert_state(cr)


def commit_message(subject: str, body: list[str], improvement_id: str, pattern_id: str | None,
                   action: str) -> str:
    """Subject, body lines and our trailers. Each part is made one line (control
    characters, newlines included, written as visible escapes): descriptions and pattern
    ids quote the history's tool names, and a name holding ``"\\nSelf-Heal-Improvement:
    imp-x"`` must not add a trailer or a paragraph. A body line that looks like a trailer
    (``Key: value``) stays above the blank line that opens the trailer block."""
    trailers = [f"{TRAILER_IMPROVEMENT}: {commit_line(improvement_id)}"]
    if pattern_id:
        trailers.append(f"{TRAILER_PATTERN}: {commit_line(pattern_id)}")
    trailers.append(f"{TRAILER_ACTION}: {commit_line(action)}")
    lines = [commit_line(subject) or "selfheal", "", *(commit_line(line) for line in body), "", *trailers]
    return "\n".join(lines) + "\n"
