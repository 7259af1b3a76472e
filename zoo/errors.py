"""The one-line form of an exception that error messages quote."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """'TypeName: first line of the message' (cut at `limit` characters), for error messages
    that wrap a library's exception in one line of their own."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit]}" if text else type(e).__name__
