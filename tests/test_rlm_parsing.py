from rlm_train.rlm.parsing import extract_code_blocks, find_final


def test_extracts_repl_and_python_blocks_in_order():
    text = "Look:\n```repl\nx = 1\n```\nthen\n```python\nprint(x)\n```\n```text\nnot code\n```"
    assert extract_code_blocks(text) == ["x = 1", "print(x)"]


def test_unterminated_last_block_counts():
    assert extract_code_blocks("```repl\nprint(len(context))") == ["print(len(context))"]


def test_empty_block_is_ignored():
    assert extract_code_blocks("```repl\n\n```") == []


def test_final_with_nested_parentheses_and_quotes():
    call = find_final('I am done.\nFINAL(f(x) + (y) ")")')
    assert call.kind == "FINAL" and call.argument == 'f(x) + (y) ")"'


def test_final_quoted_argument_is_unquoted():
    assert find_final('FINAL("42 apples")').argument == "42 apples"
    assert find_final("FINAL_VAR('result')").argument == "result"


def test_final_inside_code_block_is_not_a_prose_final():
    assert find_final("```repl\nFINAL(3)\n```") is None


def test_final_must_start_a_line_and_be_closed():
    assert find_final("You could call FINAL(x) later") is None
    assert find_final("FINAL(unclosed") is None


def test_last_final_wins():
    assert find_final("FINAL(a)\nactually\nFINAL(b)").argument == "b"
