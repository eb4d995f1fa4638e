"""From a request to prompt ids: the chat template, message text as plain text, and images in the prompt."""
