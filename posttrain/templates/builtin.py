"""Built-in chat templates (Jinja) for models that ship none, e.g. base models.

They are installed as `tokenizer.chat_template`, so training masks and chat prompts go through
the same `apply_chat_template` path as a model's own template. Each one is prefix-stable: the
generation prompt is exactly the header every assistant turn starts with, and rendering a
conversation never changes the text of earlier turns. `eos_token` comes from the tokenizer
(`apply_chat_template` passes its special tokens to the template as variables).
"""

from __future__ import annotations

# Tool calls as Hermes/Qwen-style JSON; shared by chatml and llama3 so both read the same.
_TOOL_CALLS = r"""
    {%- if message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and message.content) or not loop.first %}{{- '\n' }}{%- endif %}
            {%- set call = tool_call.function if tool_call.function else tool_call %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
"""

# The tool schemas, written into the system turn (merged with the user's system prompt if any).
_TOOLS_SYSTEM = r"""
    {%- set ns = namespace(text=messages[0].content if messages and messages[0].role == 'system' else '') %}
    {%- if tools %}
        {%- if ns.text %}{%- set ns.text = ns.text + '\n\n' %}{%- endif %}
        {%- set ns.text = ns.text + '# Tools\n\nYou may call one or more functions. '
            + 'Function signatures are within <tools></tools> XML tags:\n<tools>' %}
        {%- for tool in tools %}{%- set ns.text = ns.text + '\n' + (tool | tojson) %}{%- endfor %}
        {%- set ns.text = ns.text + '\n</tools>\n\nFor each call, return a JSON object '
            + 'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
            + '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' %}
    {%- endif %}
    {%- set system_text = ns.text %}
"""

CHATML = (
    _TOOLS_SYSTEM
    + r"""
{%- if system_text %}{{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' }}{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content }}
"""
    + _TOOL_CALLS
    + r"""
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
)

# Llama 3.1 layout; tool results use its `ipython` role.
LLAMA3 = (
    _TOOLS_SYSTEM
    + r"""
{{- '<|begin_of_text|>' }}
{%- if system_text %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' + system_text + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- else %}
        {%- set role = 'ipython' if message.role == 'tool' else message.role %}
        {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message.content }}
"""
    + _TOOL_CALLS
    + r"""
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""
)

# Alpaca and plain have no tool syntax; failing loudly beats silently dropping the tool turns.
_NO_TOOLS = r"""
{%- if tools %}{{- raise_exception('no tool syntax here; use template.name=chatml or llama3') }}{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'tool' or message.tool_calls %}
        {{- raise_exception('no tool syntax here; use template.name=chatml or llama3') }}
    {%- endif %}
{%- endfor %}
"""

ALPACA = (
    _NO_TOOLS
    + r"""
{%- for message in messages %}
    {%- if message.role == 'system' %}{{- message.content + '\n\n' }}
    {%- elif message.role == 'user' %}{{- '### Instruction:\n' + message.content + '\n\n' }}
    {%- else %}{{- '### Response:\n' + message.content + eos_token + '\n\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}
"""
)

# For base models: the text itself, one line break between turns, eos closing each answer.
PLAIN = (
    _NO_TOOLS
    + r"""
{%- for message in messages %}
    {%- if message.role == 'system' %}{{- message.content + '\n\n' }}
    {%- elif message.role == 'user' %}{{- message.content + '\n' }}
    {%- else %}{{- message.content + eos_token + '\n' }}
    {%- endif %}
{%- endfor %}
"""
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML.strip(),
    "llama3": LLAMA3.strip(),
    "alpaca": ALPACA.strip(),
    "plain": PLAIN.strip(),
}
NEEDS_EOS = ("alpaca", "plain")  # templates that close an answer with the tokenizer's eos_token
