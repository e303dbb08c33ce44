"""The progress bar on a terminal: a log line written while the bar is drawn starts on a line of its own."""
import io
import logging

from tqdm import tqdm

from ov_train.training.progress import logs_above_bars


def screen(output: str) -> list[str]:
    """The lines a terminal shows for `output` (carriage returns overwrite from column 0)."""
    lines, line, col = [], [], 0
    for ch in output:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + ["".join(line).rstrip()]


def log_during_a_bar(route: bool) -> list[str]:
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    logger = logging.getLogger("tests.progress")
    logger.addHandler(handler)
    logger.propagate = False
    restore = logs_above_bars([handler]) if route else (lambda: None)
    try:
        bar = tqdm(total=10, file=terminal, desc="train", ascii=True)
        bar.update(3)
        bar.refresh()
        logger.warning("a log line")
        bar.update(1)
        bar.close()
    finally:
        restore()
        logger.removeHandler(handler)
    assert handler.stream is terminal  # put back
    return screen(terminal.getvalue())


def test_log_lines_start_on_their_own_line_under_the_bar():
    assert "a log line" in log_during_a_bar(route=True)
    # What the terminal showed before: the line glued to the bar's.
    glued = log_during_a_bar(route=False)
    assert "a log line" not in glued and any(line.startswith("train") and line.endswith("a log line") for line in glued)
