"""Stand-in for ``comfy_api.latest.io`` (``_io.py`` in ComfyUI 0.8): schema, sockets, node base class.

Constructor signatures match ComfyUI's for the parameters the pack passes (id, display_name,
optional, tooltip, default, min, max, step, multiline, options...), so a typo or an unsupported
keyword fails here as it would in ComfyUI. ``as_dict`` gives the /object_info fields tests check.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class Input:
    Parent: Any = None

    def __init__(
        self,
        id: str,
        display_name: str | None = None,
        optional: bool = False,
        tooltip: str | None = None,
        lazy: bool | None = None,
        extra_dict: dict | None = None,
        raw_link: bool | None = None,
        advanced: bool | None = None,
    ) -> None:
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict or {}
        self.advanced = advanced

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    is_widget = False

    def as_dict(self) -> dict[str, Any]:
        return _prune({"display_name": self.display_name, "optional": self.optional or None, "tooltip": self.tooltip})


class WidgetInput(Input):
    is_widget = True

    def __init__(
        self,
        id: str,
        display_name: str | None = None,
        optional: bool = False,
        tooltip: str | None = None,
        lazy: bool | None = None,
        default: Any = None,
        socketless: bool | None = None,
        widget_type: str | None = None,
        force_input: bool | None = None,
        extra_dict: dict | None = None,
        raw_link: bool | None = None,
        advanced: bool | None = None,
    ) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default = default
        self.force_input = force_input

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _prune({"default": self.default})


class Output:
    Parent: Any = None

    def __init__(
        self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None, is_output_list=False
    ) -> None:
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self) -> str:
        return self.Parent.io_type


class ComfyTypeIO:
    io_type: str = ""

    class Input(Input):
        pass

    class Output(Output):
        pass


def comfytype(io_type: str):
    """Bind ``io_type`` to a type class and give it its own Input/Output subclasses."""

    def decorator(cls: type) -> type:
        cls.io_type = io_type
        cls.Input = type("Input", (cls.Input,), {"Parent": cls})
        cls.Output = type("Output", (cls.Output,), {"Parent": cls})
        return cls

    return decorator


def Custom(io_type: str) -> type[ComfyTypeIO]:
    @comfytype(io_type=io_type)
    class CustomComfyType(ComfyTypeIO):
        pass

    return CustomComfyType


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str | None = None,
            optional: bool = False,
            tooltip: str | None = None,
            lazy: bool | None = None,
            default: bool | None = None,
            label_on: str | None = None,
            label_off: str | None = None,
            socketless: bool | None = None,
            force_input: bool | None = None,
            extra_dict: dict | None = None,
            raw_link: bool | None = None,
            advanced: bool | None = None,
        ) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.label_on = label_on
            self.label_off = label_off


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str | None = None,
            optional: bool = False,
            tooltip: str | None = None,
            lazy: bool | None = None,
            default: int | None = None,
            min: int | None = None,
            max: int | None = None,
            step: int | None = None,
            control_after_generate: bool | None = None,
            display_mode: NumberDisplay | None = None,
            socketless: bool | None = None,
            force_input: bool | None = None,
            extra_dict: dict | None = None,
            raw_link: bool | None = None,
            advanced: bool | None = None,
        ) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate

        def as_dict(self) -> dict[str, Any]:
            extra = {"min": self.min, "max": self.max, "step": self.step}
            return super().as_dict() | _prune({**extra, "control_after_generate": self.control_after_generate})


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str | None = None,
            optional: bool = False,
            tooltip: str | None = None,
            lazy: bool | None = None,
            default: float | None = None,
            min: float | None = None,
            max: float | None = None,
            step: float | None = None,
            round: float | None = None,
            display_mode: NumberDisplay | None = None,
            gradient_stops: list | None = None,
            socketless: bool | None = None,
            force_input: bool | None = None,
            extra_dict: dict | None = None,
            raw_link: bool | None = None,
            advanced: bool | None = None,
        ) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step, self.round = min, max, step, round

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step})


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str | None = None,
            optional: bool = False,
            tooltip: str | None = None,
            lazy: bool | None = None,
            multiline: bool = False,
            placeholder: str | None = None,
            default: str | None = None,
            dynamic_prompts: bool | None = None,
            socketless: bool | None = None,
            force_input: bool | None = None,
            extra_dict: dict | None = None,
            raw_link: bool | None = None,
            advanced: bool | None = None,
        ) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline = multiline
            self.placeholder = placeholder


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            options: list[str] | list[int] | type[Enum] | None = None,
            display_name: str | None = None,
            optional: bool = False,
            tooltip: str | None = None,
            lazy: bool | None = None,
            default: str | int | Enum | None = None,
            control_after_generate: bool | None = None,
            upload: Any = None,
            image_folder: FolderType | None = None,
            remote: Any = None,
            socketless: bool | None = None,
            extra_dict: dict | None = None,
            raw_link: bool | None = None,
            advanced: bool | None = None,
        ) -> None:
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None)
            self.options = options

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | {"options": self.options}


@comfytype(io_type="IMAGE")
class Image(ComfyTypeIO):
    pass


@comfytype(io_type="MODEL")
class Model(ComfyTypeIO):
    pass


@comfytype(io_type="LORA_MODEL")
class LoraModel(ComfyTypeIO):
    pass


@comfytype(io_type="LOSS_MAP")
class LossMap(ComfyTypeIO):
    pass


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class HiddenHolder:
    """What ``cls.hidden`` holds while a node executes; unknown names read as None."""

    def __init__(self, unique_id: str | None = None, prompt: Any = None, extra_pnginfo: Any = None, **kwargs: Any):
        self.unique_id = unique_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo

    def __getattr__(self, key: str) -> Any:
        return None


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs]
        out_ids = [o.id for o in self.outputs]
        if len(set(ids)) != len(ids) or len(set(out_ids)) != len(out_ids):
            raise ValueError(f"{self.node_id}: input and output ids must be unique")

    def finalize(self) -> None:
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self) -> tuple | None:
        return self.args if self.args else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    """Base class of V3 nodes. Like ComfyUI, the executor runs a clone whose ``hidden`` is filled in."""

    hidden: HiddenHolder | None = None
    SCHEMA: Schema | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        if cls.define_schema.__func__ is ComfyNode.define_schema.__func__:
            raise Exception(f"No define_schema function was defined for node class {cls.__name__}.")
        if cls.execute.__func__ is ComfyNode.execute.__func__:
            raise Exception(f"No execute function was defined for node class {cls.__name__}.")
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def overrides(cls, name: str) -> bool:
        """Test hook: whether the node defines ``name`` (as ComfyUI's first_real_override checks)."""
        return getattr(cls, name).__func__ is not getattr(ComfyNode, name).__func__

    @classmethod
    def is_async(cls) -> bool:
        return inspect.iscoroutinefunction(cls.execute)
