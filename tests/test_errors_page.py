"""docs/errors.md against the code, both ways: every message the page quotes is the code's, word for word, and
every message a user can meet is on the page (or on `NOT_FOR_USERS` below, with the reason).

The page's convention: in the first column of its tables, each `code span` is one message as keras-adascale
raises, warns or prints it, optionally after its type (`ValueError: `); `...` stands for a value of your case
and `<name>` for a name (`<optimizer>`), both where the code has a replacement field. A message that Keras or
TensorFlow words themselves is quoted in "double quotes" and not checked.

Pure text: the sources are read with `ast` (string literals, the constant parts of f-strings, and the
strings a message is built of one or two names away: a variable's values, a parameter's arguments at the
calls in the package), nothing of keras_adascale is imported or run.
"""

import ast
import itertools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "errors.md"
PACKAGE = ROOT / "keras_adascale"

# The raises (and warnings, appended errors) a user cannot meet, by file and the start of their fixed text.
NOT_FOR_USERS = {
    ("keras_adascale/_private_api.py", "no base class of keras.Model comes from"):
        "raised only inside the private-API check (`_private_api.missing`: tests/test_private_api.py, "
        "`make compat`), which reports it as a missing name to a maintainer",
    ("keras_adascale/_private_api.py", " has no `"):
        "the private-API check's report for maintainers (`make compat`), not raised by the library",
}
# Functions whose return value is a message that a raise elsewhere passes on.
MESSAGE_FUNCTIONS = {"_unknown", "_test_split_problem"}
# Lists that collect messages for one raise (the runner's config, datasets, strategies report all at once).
MESSAGE_LISTS = {"errors", "problems", "messages"}
# A template with less fixed text than this wraps other messages (`f"{label}: {message}"`): not a message.
LEAST_FIXED = 8
# Fixed text of a site's start that the page must quote (placeholders aside).
LEADING_CHARS = 40
# Pieces of a quote shorter than this (", ", "'") are not looked up.
LEAST_PIECE = 4

_PLACEHOLDER = re.compile(r"\.\.\.|<[a-z][\w -]*>")
_TYPE = re.compile(r"^[A-Z]\w*(?:Error|Warning|Exception): ")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_MAX_OPTIONS = 32
_DEPTH = 3


# The sources.

class _Module:
    def __init__(self, path):
        self.path = path
        self.name = path.relative_to(ROOT).as_posix()
        self.tree = ast.parse(path.read_text())
        self.parent = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.constants = {}
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.constants[node.targets[0].id] = node.value

    def function_of(self, node):
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return None

    def docstrings(self):
        found = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                found.add(node.value)
        return found


class _Package:
    """The package's modules, with what resolving a name needs: functions and their calls, by name."""

    def __init__(self):
        self.modules = [_Module(path) for path in sorted(PACKAGE.rglob("*.py"))]
        self.module_of = {}
        self.functions, self.calls = {}, {}
        for module in self.modules:
            for node in ast.walk(module.tree):
                self.module_of[node] = module
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.setdefault(node.name, []).append(node)
                elif isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                    if name:
                        self.calls.setdefault(name, []).append(node)

    def options(self, node, depth=_DEPTH):
        """The texts `node` can be: tuples of str and None (a value unknown here), at most _MAX_OPTIONS."""
        found = self._options(node, depth)
        return found[:_MAX_OPTIONS] if found else [(None,)]

    def _options(self, node, depth):
        if isinstance(node, ast.Constant):
            return [(node.value,)] if isinstance(node.value, str) else [(None,)]
        if isinstance(node, ast.JoinedStr):
            # A name used twice in one f-string has one value in it (`f"Argument `{name}` ... {name}=..."`).
            keys, choices = [], {}
            for index, value in enumerate(node.values):
                if isinstance(value, ast.FormattedValue):
                    plain = value.conversion == -1 and value.format_spec is None
                    key = value.value.id if plain and isinstance(value.value, ast.Name) else index
                    if key not in choices:
                        choices[key] = self.options(value.value, depth) if plain else [(None,)]
                else:
                    key = index
                    choices[key] = self.options(value, depth)
                keys.append(key)
            unique = list(choices)
            while _count(choices.values()) > _MAX_OPTIONS:  # the most varied value becomes unknown first
                choices[max(choices, key=lambda key: len(choices[key]))] = [(None,)]
            return [_merged(sum((dict(zip(unique, combination))[key] for key in keys), ()))
                    for combination in itertools.product(*(choices[key] for key in unique))]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._product([self.options(node.left, depth), self.options(node.right, depth)])
        if isinstance(node, ast.IfExp):
            return self.options(node.body, depth) + self.options(node.orelse, depth)
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            return [option for value in node.values for option in self.options(value, depth)]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and depth > 0:
            table = self.module_of[node].constants.get(node.value.id)
            if isinstance(table, ast.Dict):
                return [option for value in table.values for option in self.options(value, depth - 1)]
        if isinstance(node, ast.Name) and depth > 0:
            return self._name_options(node, depth - 1)
        return [(None,)]

    def _product(self, parts):
        while _count(parts) > _MAX_OPTIONS:
            longest = max(range(len(parts)), key=lambda index: len(parts[index]))
            parts = parts[:longest] + [[(None,)]] + parts[longest + 1:]
        return [_merged(sum(combination, ())) for combination in itertools.product(*parts)]

    def _name_options(self, node, depth):
        module = self.module_of[node]
        function = module.function_of(node)
        values = []
        if function is not None:
            for statement in ast.walk(function):
                if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                        and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id == node.id):
                    values.append(statement.value)
            values += self._arguments(function, node.id)
        if not values and node.id in module.constants:
            values.append(module.constants[node.id])
        options = [option for value in values for option in self.options(value, depth)]
        return options or [(None,)]

    def _arguments(self, function, name):
        """The values a parameter `name` of `function` receives: its default and the calls' arguments."""
        arguments = function.args
        positional = [a.arg for a in arguments.posonlyargs + arguments.args]
        if name not in positional + [a.arg for a in arguments.kwonlyargs]:
            return []
        values = []
        defaults = dict(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
        defaults.update({a.arg: d for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None})
        if name in defaults:
            values.append(defaults[name])
        method = positional[:1] in (["self"], ["cls"])
        index = positional.index(name) - method if name in positional else None
        calls = [(call, call.args) for call in self.calls.get(function.name, [])]
        # Passed on: `validation.optional(validation.positive, total_steps, "total_steps")` calls it with
        # the arguments after the value.
        calls += [(call, call.args[position + 1:]) for calls_of in self.calls.values() for call in calls_of
                  for position, argument in enumerate(call.args)
                  if (getattr(argument, "attr", None) or getattr(argument, "id", None)) == function.name]
        for call, arguments in calls:
            for keyword in call.keywords:
                if keyword.arg == name:
                    values.append(keyword.value)
            if index is not None and 0 <= index < len(arguments) and not any(
                    isinstance(a, ast.Starred) for a in arguments[:index + 1]):
                values.append(arguments[index])
        return values


def _count(parts):
    total = 1
    for part in parts:
        total *= len(part)
    return total


def _merged(parts):
    """Adjacent strings joined, adjacent unknowns one unknown."""
    merged = []
    for part in parts:
        if part is None and merged and merged[-1] is None:
            continue
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
            continue
        if part == "":
            continue
        merged.append(part)
    return tuple(merged)


def _fixed(template):
    return [part for part in template if part is not None]


_PACKAGE = _Package()


def _literal_pool():
    """Every text the code holds, "\\0"-separated: literals (docstrings aside) and their compositions."""
    texts = set()
    for module in _PACKAGE.modules:
        docstrings = module.docstrings()
        for node in ast.walk(module.tree):
            if node in docstrings:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.add(node.value)
            elif isinstance(node, (ast.JoinedStr, ast.BinOp)):
                for template in _PACKAGE.options(node):
                    texts.update(_fixed(template))
    return "\0" + "\0".join(sorted(texts)) + "\0"


def _sites():
    """Where the package raises, warns or reports a message: `(file, line, templates)`."""
    found = []
    for module in _PACKAGE.modules:
        for node in ast.walk(module.tree):
            message = _message_of(node)
            if message is None:
                continue
            # As written (its names unknown), and with its names' values where they are found one step away.
            written = {_merged(t) for t in _PACKAGE.options(message, depth=0)}
            if max(len("".join(_fixed(t))) for t in written) >= LEAST_FIXED:
                resolved = {_merged(t) for t in _PACKAGE.options(message, depth=1)}
                found.append((module.name, node.lineno, sorted(written | resolved, key=str)))
    return found


def _message_of(node):
    """The message argument of a raise, warning, report or message builder, else None."""
    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
        return node.exc.args[0]
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = getattr(func, "attr", None) or getattr(func, "id", None)
        owner = getattr(getattr(func, "value", None), "id", None)
        if name in ("warn", "warn_explicit") and owner == "warnings":
            return node.args[0]
        if name in ("warning", "error") and owner in ("logging", "logger", "log"):
            return node.args[0]
        if name == "append" and isinstance(func.value, ast.Name) and func.value.id in MESSAGE_LISTS:
            return node.args[0]
        if name == "print" and any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords):
            return node.args[0]
        if name == "Assert" and len(node.args) > 1 and isinstance(node.args[1], ast.List):
            return node.args[1].elts[0]
    if isinstance(node, ast.Return) and node.value is not None:
        module = _PACKAGE.module_of[node]
        function = module.function_of(node)
        if function is not None and function.name in MESSAGE_FUNCTIONS:
            return node.value
    if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "problem" and isinstance(node.value, (ast.JoinedStr, ast.Constant))):
        return node.value
    return None


# The page.

def _cells(line):
    """A table row's cells; a `|` inside a code span does not split."""
    cells, current, ticks = [], "", 0
    index = 0
    body = line.strip()[1:]
    while index < len(body):
        char = body[index]
        if char == "`":
            run = len(body[index:]) - len(body[index:].lstrip("`"))
            ticks = 0 if ticks == run else (run if ticks == 0 else ticks)
            current += "`" * run
            index += run
            continue
        if char == "|" and not ticks:
            cells.append(current.strip())
            current = ""
        else:
            current += char
        index += 1
    return cells


def page_rows(text=None):
    """`(line number, message cell, other cells)` of every table row of the page but the headers."""
    text = PAGE.read_text() if text is None else text
    rows = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.startswith("|") or re.fullmatch(r"[|\s:-]+", line):
            continue
        if number < len(lines) and re.fullmatch(r"[|\s:-]+", lines[number]):
            continue  # a header
        cells = _cells(line)
        rows.append((number, cells[0], cells[1:]))
    return rows


def quotes(text=None):
    """`(line number, message)` of every message the page quotes, its type taken off."""
    found = []
    for number, cell, _ in page_rows(text):
        for match in _CODE_SPAN.finditer(cell):
            content = match.group(2)
            if content.startswith(" ") and content.endswith(" ") and content.strip():
                content = content[1:-1]
            found.append((number, _TYPE.sub("", content)))
    return found


def pieces(message):
    """The fixed pieces of a quote, around its placeholders."""
    return [piece for piece in _PLACEHOLDER.split(message) if len(piece.strip()) >= LEAST_PIECE]


def misquoted(page_text=None, pool=None):
    """`(line, quote, piece)` for each piece of a quote that no text of the code holds."""
    pool = _literal_pool() if pool is None else pool
    return [(number, message, piece) for number, message in quotes(page_text) for piece in pieces(message)
            if piece not in pool]


def _leading_pattern(template):
    """A regex of a template's start: its first LEADING_CHARS fixed characters, unknowns as wildcards."""
    parts = list(template)
    while parts and parts[0] is None:
        parts.pop(0)
    pattern, fixed = "", 0
    for part in parts:
        if fixed >= LEADING_CHARS:
            break
        if part is None:
            pattern += r"\S*?"  # a value: "...", "<name>" or one word
            continue
        part = part.lstrip() if not pattern else part
        take = part[:LEADING_CHARS - fixed] if fixed + len(part) > LEADING_CHARS else part
        take, newline, _ = take.partition("\n")  # a list of messages follows: the page quotes the first line
        pattern += re.escape(take)
        fixed += len(take)
        if newline:
            break
    return pattern


def unlisted(page_text=None, sites=None):
    """`(file, line, start)` for each message site the page does not quote, `NOT_FOR_USERS` aside."""
    texts = [message for _, message in quotes(page_text)]
    missing = []
    for name, line, templates in _sites() if sites is None else sites:
        if any(_allowed(name, template) for template in templates):
            continue
        # One of a site's forms is enough ("1 device" / "4 devices", "is not set" / "are not set").
        if not any(re.search(_leading_pattern(template), text) for template in templates for text in texts):
            missing.append((name, line, "".join(part if part is not None else "..." for part in templates[0])[:90]))
    return missing


def _allowed(name, template):
    start = next((part for part in template if part is not None and len(part.strip()) > 0), "")
    return any(name == file and start.startswith(prefix) for file, prefix in NOT_FOR_USERS)


# The tests.

def test_every_quoted_message_is_the_code_s():
    problems = misquoted()
    assert not problems, "docs/errors.md quotes text the code does not hold (line, quote, piece):\n" + "\n".join(
        f"  {line}: {quote!r}\n      {piece!r}" for line, quote, piece in problems)


def test_every_message_a_user_can_meet_is_on_the_page():
    problems = unlisted()
    assert not problems, ("messages of keras_adascale/ that docs/errors.md does not quote (add a row, or to "
                          "NOT_FOR_USERS with the reason):\n" + "\n".join(f"  {f}:{n}: {s!r}" for f, n, s in problems))


def test_every_row_quotes_a_message_and_says_what_to_do():
    for number, cell, others in page_rows():
        assert _CODE_SPAN.search(cell) or '"' in cell, f"docs/errors.md:{number}: no message quoted"
        assert others and others[-1].strip(), f"docs/errors.md:{number}: no advice"


def test_every_not_for_users_entry_is_still_in_the_code():
    sites = _sites()
    for (file, prefix), reason in NOT_FOR_USERS.items():
        assert reason
        assert any(name == file and _allowed(name, template) and any(
            (part or "").startswith(prefix) for part in template)
            for name, _, templates in sites for template in templates), (file, prefix)


def test_the_page_names_every_top_level_export():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    exported = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(target, "id", None) == "__all__" for target in node.targets))
    row = next(others for _, cell, others in page_rows() if "has no attribute" in cell)
    for name in exported:
        assert f"`{name}`" in " ".join(row), f"docs/errors.md's AttributeError row does not name {name}"


# The checks fail where they should.

def test_a_misquoted_message_is_found():
    pool = _literal_pool()
    page = ("| message | what to do |\n| --- | --- |\n"
            "| `ValueError: ... was made for ... replicas on the batch axis` | Make it after set_distribution. |\n"
            "| `RuntimeError: `set_scale` must be called eagerly, between steps (not in a tf.function)` | x |\n")
    found = {piece.strip() for _, _, piece in misquoted(page, pool)}
    assert "replicas on the batch axis" in found
    assert "must be called eagerly, between steps (not in a tf.function)" in found
    good = "| `ValueError: ... was made for ... device on the batch axis, but the distribution's` | x |\n"
    assert misquoted("| message | what to do |\n| --- | --- |\n" + good, pool) == []


def test_a_message_missing_from_the_page_is_found():
    sites = _sites()
    text = PAGE.read_text()
    row = next(line for line in text.splitlines() if "subclasses AdaScaleModel: build it" in line)
    missing = unlisted(text.replace(row + "\n", ""), sites)
    assert [(name, "subclasses AdaScaleModel: build it" in start) for name, _, start in missing] == [
        ("keras_adascale/model.py", True)]


@pytest.mark.parametrize("message, expected", [
    ("ValueError: Argument `scale` is ..., but", ["Argument `scale` is ", ", but"]),
    ("<optimizer> was made for ... device on the batch axis", [" was made for ", " device on the batch axis"]),
])
def test_pieces(message, expected):
    assert pieces(_TYPE.sub("", message)) == expected
