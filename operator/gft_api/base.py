"""The base model every API type derives from: camelCase on the wire, strict about unknown keys."""

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """camelCase field names on the wire (Kubernetes style), snake_case in Python.

    Unknown keys are errors: a misspelt field should fail loudly, not be silently ignored.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict:
        """The object as Kubernetes and the config file spell it (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
