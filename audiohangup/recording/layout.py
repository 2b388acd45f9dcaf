# -*- test-case-name: tests.test_recording -*-
"""
The record directory: C{DIR/YYYY-MM-DD/<call id>.wav}, then C{-2}, C{-3}
for a later recording of the same call that day.

Its folders and files are the owner's only (0700, 0600: a call's audio is
private), and nothing here follows a symbolic link: a file is created with
C{O_EXCL}/C{O_NOFOLLOW} in a day folder opened with C{O_NOFOLLOW}, and a link
found while listing is handed back to the caller (to be skipped with a
warning), never served nor repaired. Plain functions, run off the reactor.
"""

from __future__ import annotations

import os
import re

#: The recorder's files and folders: the owner's only, whatever the umask.
FILE_MODE = 0o600
FOLDER_MODE = 0o700
#: A call's recording, and a later one of the same call on the same day (-2, -3, ...).
WAV_NAME = re.compile(r"^(?P<call>[0-9a-f-]{36})(?:-(?P<n>[1-9][0-9]*))?\.wav$")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def wav_name(call_id: str, number: int) -> str:
    """The file name of a call's recording number C{number} of a day; what L{WAV_NAME} reads back."""
    return f"{call_id}.wav" if number == 1 else f"{call_id}-{number}.wav"


def open_in_folder(path: str, flags: int) -> int:
    """
    A descriptor for C{path} that follows a link in neither of its last two
    parts (the day folder, the file): where one is, an OSError (C{ELOOP}).
    """
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return os.open(os.path.basename(path), flags | os.O_NOFOLLOW, FILE_MODE, dir_fd=folder)
    finally:
        os.close(folder)


def create(path: str) -> int:
    """A new recording's file, 0600: never one already there (C{O_EXCL}), nor a link's target."""
    fd = open_in_folder(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.fchmod(fd, FILE_MODE)  # an odd umask may have taken the owner's bits too
    return fd


def make_folders(path: str) -> None:
    """C{path} and its missing parents, each made 0700; one already there is left as it is."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        make_folders(parent)
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileExistsError:
        return
    os.chmod(path, FOLDER_MODE)


def day_folders(directory: str, links: list[str]) -> list[str]:
    """The day folders of the record directory, oldest first; links among them are added to C{links}, not followed."""
    if not os.path.isdir(directory):
        return []
    days = []
    for entry in os.scandir(directory):
        if DAY.match(entry.name):
            if entry.is_symlink():
                links.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                days.append(entry.name)
    return sorted(days)


def last_recording(directory: str, call_id: str) -> tuple[str | None, list[str]]:
    """
    The path of a call's last recording (its highest number on its last
    day), and the links found on the way (skipped). Off the reactor: a day
    without the call's first file costs one C{lstat}, a year of days one
    listing of the directory and a few hundred of those.
    """
    links: list[str] = []
    for day in reversed(day_folders(directory, links)):
        folder = os.path.join(directory, day)
        if not os.path.lexists(os.path.join(folder, wav_name(call_id, 1))):
            continue
        numbers = []
        for entry in os.scandir(folder):
            match = WAV_NAME.match(entry.name)
            if match is not None and match["call"] == call_id:
                if entry.is_symlink():
                    links.append(f"{day}/{entry.name}")
                elif entry.is_file(follow_symlinks=False):
                    numbers.append(int(match["n"] or 1))
        if numbers:
            return os.path.join(folder, wav_name(call_id, max(numbers))), links
    return None, links
