"""`python -m embedding_client.cli` is `embed-files`."""

from embedding_client.cli.main import main

raise SystemExit(main())
