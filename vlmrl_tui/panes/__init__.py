"""The dashboard's panes, one module each, plus the shared messages and the run feed.

``feed`` is plain Python (no Textual): it reads the run directory and is what the
app's reader worker and the log benchmark drive.
"""
