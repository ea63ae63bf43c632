"""The terminal chat app (``granite-chat``, ``granite-mlx chat``).

Modules: ``app`` (the Textual app and the command line), ``protocol`` (the messages
between the app and the engine), ``engine`` (the thread that owns the model),
``fake_engine`` (a scripted model for tests), ``store`` (chats in SQLite), ``widgets``,
``screens`` (modal dialogs), ``export`` (Markdown export) and ``chat.tcss``.
"""
