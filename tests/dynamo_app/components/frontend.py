"""A component without KV methods, like Dynamo's Frontend and Processor."""

from dynamo_service import service


@service
class Frontend:
    def generate(self, prompt: str) -> str:
        return prompt
