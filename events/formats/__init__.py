"""One module per event-file format; each exposes ``parse(data, *, name, limits) -> Recording``.

``events.readers.read`` sniffs the format and dispatches here; the parsers never see anything but
an in-memory buffer (except AEDAT 4, whose decoder wants a path).
"""
