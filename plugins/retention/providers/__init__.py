"""Local stand-ins for the messaging providers (SendGrid, FCM, Telegram, an SMS/Viber
gateway) that speak their wire protocols on 127.0.0.1, for tests, benchmarks and the demo."""
