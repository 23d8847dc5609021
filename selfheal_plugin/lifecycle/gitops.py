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
* Our commits are dated by the caller's clock (the service's ``now``): the instant the
  database records for the change (``applied_at``, ...) is the commit's, so ``learn`` (which
  reads commit times) and a reader of ``git log`` see one timeline — with the wall clock
  that changes nothing; with a simulated one (the demo) it keeps git in step with the history.
* A failed git command is reported with git's own reason (``Unable to create
  '.git/index.lock': File exists``), on one line.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from selfheal_plugin.lazy import lazy_module
from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.text import commit_line

git = lazy_module("git")  # imported on first use: start-up does not pay for it

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
FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # a full object name, never a ref or an option


class GitOpsError(SelfHealError):
    """A git state selfheal refuses to work in (dirty config, missing commit, ...)."""


def identity_env(when: datetime | None = None) -> dict[str, str]:
    """Our identity, and the commit's date when ``when`` is given (else git's own clock)."""
    env = {"GIT_AUTHOR_NAME": IDENTITY_NAME, "GIT_AUTHOR_EMAIL": IDENTITY_EMAIL,
           "GIT_COMMITTER_NAME": IDENTITY_NAME, "GIT_COMMITTER_EMAIL": IDENTITY_EMAIL}
    if when is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{int(when.timestamp())} +0000"
    return env


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

    def git(self, *args: str, when: datetime | None = None) -> str:
        """Run ``git <args>`` in the work tree with our identity (a commit dated ``when``);
        raises GitOpsError."""
        assert self.repo is not None
        try:
            return self.repo.git.execute(
                ["git", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", *args],
                env=identity_env(when))
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
    try:  # git refuses a repository owned by someone else ("dubious ownership"): one line
        cr.git("rev-parse", "--git-dir")
    except GitOpsError as exc:
        raise GitOpsError(f"git refuses the repository at {root} holding {real}: "
                          f"{str(exc).split(': ', 1)[-1]}; nothing was changed") from None
    if repo.ignored(cr.rel):
        raise GitOpsError(f"{cr.rel} is ignored by the git repository at {root}; selfheal only changes a "
                          "config file that git versions (remove it from .gitignore)")
    return cr


def ensure_repo(cr: ConfigRepo, when: datetime | None = None) -> ConfigRepo:
    """Create the BINKS_HOME repository when there is none, with a first commit (dated
    ``when``) of the ``.gitignore`` and the config as it is (so our change is a diff against it).

    Idempotent: a repository we created whose first commit was interrupted gets it now.
    """
    if cr.repo is None:
        cr.root.mkdir(parents=True, exist_ok=True)
        cr.repo = git.Repo.init(cr.root)
    gi = cr.root / ".gitignore"
    if head_sha(cr) is None:
        # (never through a symlink or into a FIFO: lexists/is_file, not exists/read)
        absent = not os.path.lexists(gi)
        ours = absent or (not gi.is_symlink() and gi.is_file() and gi.read_text(
            encoding="utf-8", errors="replace").startswith(GITIGNORE_MARKER))
        if ours:
            if absent:
                gi.write_text(GITIGNORE, encoding="utf-8")
            paths = [".gitignore"] + ([cr.rel] if cr.real_path.exists() else [])
            cr.git("add", "--", *paths)
            cr.git("commit", "--no-verify", "-q", "-m",
                   "selfheal: start versioning config.toml\n\nThe config as it was before selfheal changed it.",
                   "--", *paths, when=when)
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


def check_writable(cr: ConfigRepo) -> None:
    """Refuse a config file selfheal must not replace: not a regular file (a FIFO, a
    directory, a dangling symlink), read-only, or in a repository on a detached HEAD
    (a commit there disappears at the next checkout)."""
    try:
        st = os.stat(cr.real_path)
    except FileNotFoundError:
        if os.path.islink(cr.config_path):
            raise GitOpsError(f"{cr.config_path} is a symlink to {cr.real_path}, which does not exist; "
                              "nothing was changed") from None
        st = None
    except OSError as exc:
        raise GitOpsError(f"cannot inspect {cr.real_path}: {exc.strerror or exc}; nothing was changed") from None
    if st is not None:
        check_file_writable(cr.real_path, st)
    if cr.repo is not None and head_sha(cr) is not None and cr.repo.head.is_detached:
        raise GitOpsError(f"the git repository at {cr.root} is on a detached HEAD ({head_sha(cr)[:12]}); a commit "
                          "there would be lost at the next checkout. Check out a branch first; nothing was changed")


def can_write_in(folder: Path) -> bool:
    """Whether this process may create and rename files in ``folder`` (the nearest existing
    ancestor when it does not exist yet), asked with the effective ids where the system
    can: a root without CAP_DAC_OVERRIDE is refused like anyone else."""
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        return os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)
    except OSError:
        return False


def check_can_commit(cr: ConfigRepo) -> None:
    """Refuse, before anything is created or committed, a config folder, home or repository
    this user cannot write: the atomic write needs the config's folder, a new repository the
    home, a commit the repository's ``.git`` and its objects."""
    needs = [(cr.real_path.parent, "the folder of the config file")]
    if cr.repo is None:
        needs.append((cr.root, "the home, where its git repository would be created"))
    else:
        git_dir = Path(cr.repo.git_dir)
        needs += [(git_dir, "its git repository"), (git_dir / "objects", "its git repository")]
    for folder, what in needs:
        if not can_write_in(folder):
            raise GitOpsError(f"the home is read-only for this user ({folder}, {what}): selfheal cannot "
                              "change and commit config.toml; nothing was changed")


def check_file_writable(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse to replace ``path`` unless it is a regular file its owner may write."""
    try:
        st = st or os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise GitOpsError(f"{path} is not a regular file ({_file_kind(st.st_mode)}); selfheal only edits "
                          "a regular config.toml, nothing was changed")
    if not st.st_mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise GitOpsError(f"{path} is read-only; selfheal does not replace a file its owner made "
                          "read-only (chmod u+w it to allow changes), nothing was changed")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_clean(cr: ConfigRepo) -> None:
    """Refuse a config file selfheal must not write (:func:`check_writable`) or with
    uncommitted edits (modified, staged, deleted, or untracked with content in an existing
    repository)."""
    check_writable(cr)
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


def commit_config(cr: ConfigRepo, message: str, when: datetime | None = None) -> str:
    """Commit the config file alone, dated ``when`` (the caller's clock; default git's);
    returns the new commit's sha."""
    if cr.real_path.exists():
        cr.git("add", "--", cr.rel)
    cr.git("commit", "--no-verify", "-q", "--only", "-m", message, "--", cr.rel, when=when)
    return head_sha(cr)


def file_at(cr: ConfigRepo, rev: str) -> str | None:
    """The config's content at ``rev`` (None when the file is not in that commit)."""
    try:
        blob = cr.repo.commit(rev).tree / cr.rel
    except (KeyError, ValueError, git.BadName):
        return None
    try:
        return blob.data_stream.read().decode("utf-8")
    except UnicodeDecodeError:
        raise GitOpsError(f"{cr.rel} at {rev[:12]} is not valid UTF-8") from None


def has_commit(cr: ConfigRepo, sha: str) -> bool:
    """Is ``sha`` (a full object name, never a ref, a range or an option) a commit here?"""
    if cr.repo is None or not isinstance(sha, str) or not FULL_SHA.match(sha):
        return False
    try:  # GitPython's repo.commit(sha) does not check that the object exists
        cr.git("cat-file", "-e", f"{sha}^{{commit}}")
        return True
    except GitOpsError:
        return False


def reachable(cr: ConfigRepo, sha: str) -> bool:
    """Is the commit ``sha`` in the history of HEAD (the current branch)?"""
    if not has_commit(cr, sha) or head_sha(cr) is None:
        return False
    try:
        return bool(cr.repo.is_ancestor(sha, "HEAD"))
    except git.GitCommandError:
        return False


def untrusted_commit(cr: ConfigRepo, sha: object, improvement_id: str, action: str | None) -> str | None:
    """Why ``sha`` (read from the database) is not a commit selfheal made for this
    improvement in this repository — None when it is: a full sha of a commit reachable
    from HEAD, whose message carries our trailers ``Self-Heal-Improvement: <id>`` (and
    ``Self-Heal-Action: <action>``), and which changed the config file only."""
    shown = str(sha)[:40]
    if not isinstance(sha, str) or not FULL_SHA.match(sha):
        return f"{shown!r} is not a commit id"
    if cr.repo is None or not has_commit(cr, sha):
        return f"commit {sha[:12]} is not in the repository at {cr.root}"
    if not reachable(cr, sha):
        return f"commit {sha[:12]} is not in the history of HEAD in {cr.root}"
    lines = {ln.strip() for ln in str(cr.repo.commit(sha).message).splitlines()}
    if f"{TRAILER_IMPROVEMENT}: {improvement_id}" not in lines or (
            action is not None and f"{TRAILER_ACTION}: {action}" not in lines):
        return (f"commit {sha[:12]} does not carry selfheal's trailers for {improvement_id}"
                + (f" ({action})" if action else ""))
    files = [f for f in cr.git("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", sha).splitlines() if f]
    if files != [cr.rel]:
        return f"commit {sha[:12]} changes {', '.join(files[:3]) or 'nothing'}, not only {cr.rel}"
    return None


def changed_since(cr: ConfigRepo, sha: str) -> bool:
    """Did a commit after ``sha`` (on the current branch) touch the config file?"""
    return bool(cr.git("log", "--format=%H", f"{sha}..HEAD", "--", cr.rel).strip())


def find_commit(cr: ConfigRepo, improvement_id: str, action: str, since: str | None) -> str | None:
    """Our commit for (improvement, action) made after ``since`` (for crash recovery)."""
    if cr.repo is None or head_sha(cr) is None:
        return None
    if since and not has_commit(cr, since):  # never a ref, a range or an option from the database
        raise GitOpsError(f"{str(since)[:40]!r} is not a commit of the repository at {cr.root}")
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


SUBJECT_LIMIT = 72


def commit_subject(text: str, limit: int = SUBJECT_LIMIT) -> str:
    """A commit subject of at most ``limit`` characters: cut at the last word that fits,
    the cut marked with an ellipsis (a single word longer than the limit is cut inside it)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[:limit - 1]
    cut = head.rfind(" ")
    if cut > limit // 2:
        head = head[:cut]
    return head.rstrip(" ,;:-(") + "…"


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
    lines = [commit_subject(commit_line(subject)) or "selfheal", "", *(commit_line(line) for line in body), "",
             *trailers]
    return "\n".join(lines) + "\n"
