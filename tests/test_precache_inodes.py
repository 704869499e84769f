"""The precache inode table on its own: plain data, no FUSE, no backing tree."""

from __future__ import annotations

from guestagent.precache.inodes import ROOT, InodeTable, moved


def test_a_file_keeps_its_inode_while_the_kernel_holds_a_lookup() -> None:
    t = InodeTable("/b", (1, 2))
    assert t.path(ROOT) == "/b" and t.known((1, 2))
    assert t.ino_for((1, 10)) == ROOT + 1  # not known yet: the one it would get next
    ino = t.remember("/b/f", (1, 10))
    assert ino == ROOT + 1 and t.ino_for((1, 10)) == ino
    assert t.remember("/b/g", (1, 10)) == ino  # a hard link: the same file, a second path
    assert t.path(ino) in {"/b/f", "/b/g"}
    assert t.forget(ino, 1) is None  # one lookup of two: still known
    assert t.forget(ino, 1) == (1, 10)  # the last: gone, its key handed back
    assert t.path(ino) is None and not t.known((1, 10))
    assert t.remember("/b/f", (1, 10)) == ROOT + 2  # known again: a fresh inode number


def test_the_root_and_unknown_inodes_are_never_forgotten() -> None:
    t = InodeTable("/b", (1, 2))
    assert t.forget(ROOT, 5) is None and t.path(ROOT) == "/b"
    assert t.forget(99, 1) is None
    assert list(t.inodes()) == []
    t.remember("/b/f", (1, 3))
    assert list(t.inodes()) == [ROOT + 1] and len(t) == 2


def test_rename_moves_a_path_and_everything_under_it() -> None:
    t = InodeTable("/b", (1, 2))
    d = t.remember("/b/d", (1, 3))
    f = t.remember("/b/d/f", (1, 4))
    other = t.remember("/b/dx", (1, 5))  # a sibling that only shares a prefix
    t.rename("/b/d", "/b/e")
    assert t.path(d) == "/b/e" and t.path(f) == "/b/e/f" and t.path(other) == "/b/dx"


def test_exchange_swaps_two_trees_and_drop_path_forgets_one_name() -> None:
    t = InodeTable("/b", (1, 2))
    a = t.remember("/b/a", (1, 3))
    a_child = t.remember("/b/a/x", (1, 4))
    b = t.remember("/b/b", (1, 5))
    t.exchange("/b/a", "/b/b")
    assert t.path(a) == "/b/b" and t.path(a_child) == "/b/b/x" and t.path(b) == "/b/a"
    t.drop_path("/b/a")
    assert t.path(b) is None  # no name left: lookups of it answer ENOENT
    assert t.known((1, 5))  # but the kernel still holds it until it forgets


def test_moved_replaces_a_prefix_only_at_a_path_boundary() -> None:
    assert moved("/a", "/a", "/z") == "/z"
    assert moved("/a/b/c", "/a", "/z") == "/z/b/c"
    assert moved("/ab", "/a", "/z") is None
