"""Test sentences: several languages and scripts, short and long."""

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der Zug nach München hat heute zwanzig Minuten Verspätung.",
    "El modelo convierte cada frase en un vector de números reales.",
    "東京は日本の首都です。",
    "Мы измеряем задержку и пропускную способность сервиса.",
    "a",
    "gRPC streams let a bulk job send millions of chunks without one request per chunk, "
    "while the server reads them only as fast as it can embed them and tells the client "
    "to slow down through HTTP/2 flow control rather than by failing its calls.",
    "Emoji and symbols: ✓ ∑ π ≈ 3.14159 🚀",
]
