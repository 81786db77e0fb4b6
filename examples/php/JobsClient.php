<?php

/**
 * A client for trismtp's jobs service: JSON-RPC 2.0 over a WebSocket.
 *
 * Drop this file into your project (PHP 8.1 or newer). It needs nothing but
 * what php-cli ships with: stream sockets, json, base64 and random_bytes
 * (plus the openssl extension for wss:// URLs only).
 *
 *     $client = JobsClient::connect('ws://127.0.0.1:6001/rpc', token: getenv('TRISMTP_JOBS_TOKEN') ?: '');
 *     $jobs = $client->reserve('smtp', max: 10, lease: 60);
 *     foreach ($jobs as $job) {
 *         $email = json_decode($job['payload'], true, 512, JSON_THROW_ON_ERROR);
 *         // ... your work ...
 *         $client->ack([$job['id']]);
 *     }
 *     $client->close();
 *
 * Errors:
 * - JobsUnavailable: the service cannot be reached (connection refused, timeout),
 *   refused the handshake (HTTP 401: wrong or missing token), or the connection
 *   was lost. The message says which. The client cannot be used afterwards:
 *   connect again. A job you had reserved and not acked comes back after its lease.
 * - RpcError: the service answered the call with a JSON-RPC error object
 *   (getCode() is the JSON-RPC code, e.g. -32001 "no such pipeline"; getData()
 *   its data). The connection stays usable.
 *
 * The protocol is described in trismtp's docs/rpc.md, the job and the email
 * payload in docs/payload.md.
 */

declare(strict_types=1);

namespace Trismtp\Jobs;

/** Cannot reach the jobs service, it refused the handshake, or the connection was lost. */
class JobsUnavailable extends \RuntimeException
{
}

/** The jobs service answered a call with a JSON-RPC error object. */
class RpcError extends \RuntimeException
{
    public function __construct(string $message, int $code, private readonly mixed $data = null)
    {
        parent::__construct($message, $code);
    }

    /** The error's "data" member, if any (e.g. {"pipelines": [...]} for -32001). */
    public function getData(): mixed
    {
        return $this->data;
    }
}

/**
 * An Ack, Nack or Extend named jobs whose lease is no longer yours (-32006): the
 * lease ran out and another consumer holds the job now, or it is gone. Those
 * jobs were not touched; the others of the call were.
 */
class LeaseLost extends RpcError
{
    /** @return list<string> the ids whose lease token was stale */
    public function staleIds(): array
    {
        $data = $this->getData();
        return is_array($data) && is_array($data['stale'] ?? null) ? array_map('strval', $data['stale']) : [];
    }
}

/**
 * A WebSocket client connection (RFC 6455), blocking, one message at a time.
 *
 * It sends masked text frames, reads the server's frames (7-, 16- and 64-bit
 * lengths, fragmented messages, pings answered with pongs, control frames in
 * the middle of a fragmented message) and does the close handshake. No
 * extensions (no compression) are offered, so none can be agreed.
 */
final class WebSocket
{
    private const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
    private const OP_CONTINUATION = 0x0;
    private const OP_TEXT = 0x1;
    private const OP_BINARY = 0x2;
    private const OP_CLOSE = 0x8;
    private const OP_PING = 0x9;
    private const OP_PONG = 0xA;
    private const MAX_HANDSHAKE_BYTES = 16384;
    private const CLOSE_TIMEOUT = 2.0;

    /** @var resource|null */
    private $stream;
    /** Bytes received but not parsed yet. */
    private string $buffer = '';
    private ?string $failure = null;

    /** @param resource $stream */
    private function __construct($stream, private readonly string $display, private readonly int $maxMessageSize)
    {
        $this->stream = $stream;
    }

    /**
     * Open a connection to $url (ws://HOST[:PORT]/PATH or wss://...), sending
     * $headers (name => value) with the handshake. $timeout bounds the
     * connection, the handshake and, later, each wait for a message.
     */
    public static function connect(string $url, array $headers = [], float $timeout = 30.0, int $maxMessageSize = 256 * 1024 * 1024): self
    {
        $parts = parse_url($url);
        $scheme = strtolower($parts['scheme'] ?? '');
        if (($scheme !== 'ws' && $scheme !== 'wss') || !isset($parts['host']) || $parts['host'] === '') {
            throw new \InvalidArgumentException("not a WebSocket URL (ws://HOST:PORT/PATH): $url");
        }
        $tls = $scheme === 'wss';
        $host = $parts['host']; // an IPv6 address keeps its brackets here
        $defaultPort = $tls ? 443 : 80;
        $port = $parts['port'] ?? $defaultPort;
        $path = ($parts['path'] ?? '/') . (isset($parts['query']) ? '?' . $parts['query'] : '');
        $hostHeader = $port === $defaultPort ? $host : "$host:$port";
        // Never show the query string or user info: either may hold a secret.
        $display = "$scheme://$hostHeader" . ($parts['path'] ?? '/');

        if ($tls && !extension_loaded('openssl')) {
            throw new JobsUnavailable("cannot connect to $display: wss:// needs PHP's openssl extension");
        }
        $context = stream_context_create(['ssl' => [
            'peer_name' => trim($host, '[]'),
            'verify_peer' => true,
            'verify_peer_name' => true,
        ]]);
        $errno = 0;
        $errstr = '';
        // Collect PHP's warnings instead of printing them: for a TLS failure
        // the reason is only there ($errstr stays empty).
        $warnings = [];
        set_error_handler(function (int $level, string $message) use (&$warnings): bool {
            $warnings[] = preg_replace('/^stream_socket_client\(\): /', '', $message);
            return true;
        });
        try {
            $stream = stream_socket_client(
                ($tls ? 'tls' : 'tcp') . "://$host:$port",
                $errno,
                $errstr,
                $timeout,
                STREAM_CLIENT_CONNECT,
                $context,
            );
        } finally {
            restore_error_handler();
        }
        if ($stream === false) {
            $reason = $errstr !== '' && $errstr !== 'Unknown error' ? $errstr : ($warnings[0] ?? "error $errno");
            if (stripos($reason, 'refused') !== false) {
                $reason .= ' (is the jobs service running there?)';
            }
            throw new JobsUnavailable("cannot connect to $display: $reason");
        }
        $ws = new self($stream, $display, $maxMessageSize);
        $ws->setTimeout($timeout);
        try {
            $ws->handshake($hostHeader, $path, $headers);
        } catch (\Throwable $e) {
            $ws->abort();
            throw $e;
        }
        return $ws;
    }

    /** Wait at most $seconds for each message (and each write). */
    public function setTimeout(float $seconds): void
    {
        $whole = (int) floor($seconds);
        stream_set_timeout($this->stream, $whole, (int) (($seconds - $whole) * 1e6));
    }

    /** Send one text message (UTF-8). */
    public function sendText(string $text): void
    {
        $this->sendFrame(self::OP_TEXT, $text);
    }

    /**
     * The next text or binary message. Pings are answered on the way. Throws
     * JobsUnavailable when the server closes the connection or breaks the protocol.
     */
    public function receive(): string
    {
        $message = null; // the message being put together from its frames
        while (true) {
            [$fin, $opcode, $payload] = $this->readFrame();
            if ($opcode === self::OP_PING) {
                $this->sendFrame(self::OP_PONG, $payload);
                continue;
            }
            if ($opcode === self::OP_PONG) {
                continue; // we send no pings; an unsolicited pong is allowed and ignored
            }
            if ($opcode === self::OP_CLOSE) {
                $this->closedByServer($payload);
            }
            if ($opcode === self::OP_TEXT || $opcode === self::OP_BINARY) {
                if ($message !== null) {
                    $this->protocolError('a new message began before the previous one ended');
                }
                $message = $payload;
            } elseif ($opcode === self::OP_CONTINUATION) {
                if ($message === null) {
                    $this->protocolError('a continuation frame came without a message to continue');
                }
                $message .= $payload;
            } else {
                $this->protocolError("unknown opcode $opcode");
            }
            if (strlen($message) > $this->maxMessageSize) {
                $this->protocolError("a message is larger than {$this->maxMessageSize} bytes", 1009);
            }
            if ($fin) {
                return $message;
            }
        }
    }

    /** The close handshake: send a close frame, wait briefly for the server's, then disconnect. */
    public function close(int $code = 1000, string $reason = ''): void
    {
        if ($this->stream === null) {
            return;
        }
        try {
            $this->sendFrame(self::OP_CLOSE, pack('n', $code) . $reason);
            $this->setTimeout(self::CLOSE_TIMEOUT);
            while (true) {
                [, $opcode] = $this->readFrame(); // messages still arriving are dropped
                if ($opcode === self::OP_CLOSE) {
                    break;
                }
            }
        } catch (JobsUnavailable) {
            // The server went away first, or took too long: nothing left to do.
        }
        $this->abort();
    }

    // -- the handshake ---------------------------------------------------------

    private function handshake(string $hostHeader, string $path, array $headers): void
    {
        $key = base64_encode(random_bytes(16));
        $request = "GET $path HTTP/1.1\r\n"
            . "Host: $hostHeader\r\n"
            . "Upgrade: websocket\r\n"
            . "Connection: Upgrade\r\n"
            . "Sec-WebSocket-Key: $key\r\n"
            . "Sec-WebSocket-Version: 13\r\n";
        foreach ($headers as $name => $value) {
            if (preg_match('/[\r\n]/', $name . $value)) {
                throw new \InvalidArgumentException("header $name: no line breaks allowed");
            }
            $request .= "$name: $value\r\n";
        }
        $this->write($request . "\r\n");

        // The response head; anything after it already belongs to the frames.
        while (($end = strpos($this->buffer, "\r\n\r\n")) === false) {
            if (strlen($this->buffer) > self::MAX_HANDSHAKE_BYTES) {
                throw new JobsUnavailable("{$this->display} answered the handshake with an overlong HTTP head");
            }
            $this->fill(strlen($this->buffer) + 1, 'the handshake response');
        }
        $lines = explode("\r\n", substr($this->buffer, 0, $end));
        $this->buffer = substr($this->buffer, $end + 4);
        if (!preg_match('#^HTTP/1\.[01] (\d{3})(?: (.*))?$#', $lines[0], $status)) {
            throw new JobsUnavailable("{$this->display} is not a WebSocket server: it answered " . json_encode($lines[0]));
        }
        $code = (int) $status[1];
        $response = [];
        foreach (array_slice($lines, 1) as $line) {
            [$name, $value] = array_pad(explode(':', $line, 2), 2, '');
            $name = strtolower(trim($name));
            $response[$name] = isset($response[$name]) ? $response[$name] . ', ' . trim($value) : trim($value);
        }
        if ($code === 401) {
            throw new JobsUnavailable(isset($headers['Authorization'])
                ? "{$this->display} refused the token (HTTP 401): check --token / jobs_service.token"
                : "{$this->display} requires a token (HTTP 401) and none was given");
        }
        if ($code === 404) {
            throw new JobsUnavailable("{$this->display}: no jobs RPC at this path (HTTP 404); it is at /rpc");
        }
        if ($code !== 101) {
            $text = isset($status[2]) ? " {$status[2]}" : '';
            throw new JobsUnavailable("{$this->display} rejected the WebSocket handshake with HTTP $code$text");
        }
        $expected = base64_encode(sha1($key . self::GUID, true));
        $connection = array_map('trim', explode(',', strtolower($response['connection'] ?? '')));
        if (strtolower($response['upgrade'] ?? '') !== 'websocket' || !in_array('upgrade', $connection, true)) {
            throw new JobsUnavailable("{$this->display} answered 101 without 'Upgrade: websocket'");
        }
        if (!hash_equals($expected, $response['sec-websocket-accept'] ?? '')) {
            throw new JobsUnavailable("{$this->display} sent a wrong Sec-WebSocket-Accept: not a WebSocket server");
        }
        if (($response['sec-websocket-extensions'] ?? '') !== '') {
            throw new JobsUnavailable("{$this->display} agreed to an extension that was not offered");
        }
    }

    // -- frames ----------------------------------------------------------------

    /** Send one frame: FIN set, masked with a fresh random key (clients must mask). */
    private function sendFrame(int $opcode, string $payload): void
    {
        $length = strlen($payload);
        $head = chr(0x80 | $opcode);
        if ($length < 126) {
            $head .= chr(0x80 | $length);
        } elseif ($length < 65536) {
            $head .= chr(0x80 | 126) . pack('n', $length);
        } else {
            $head .= chr(0x80 | 127) . pack('J', $length);
        }
        $mask = random_bytes(4);
        // String XOR works byte by byte, as long as the shorter operand.
        $masked = $length === 0 ? '' : $payload ^ str_repeat($mask, intdiv($length, 4) + 1);
        $this->write($head . $mask . $masked);
    }

    /** @return array{0: bool, 1: int, 2: string} FIN, opcode, payload */
    private function readFrame(): array
    {
        $head = $this->read(2, 'a message');
        $first = ord($head[0]);
        $second = ord($head[1]);
        $fin = ($first & 0x80) !== 0;
        $opcode = $first & 0x0F;
        if (($first & 0x70) !== 0) {
            $this->protocolError('reserved bits set in a frame, but no extension was agreed');
        }
        if (($second & 0x80) !== 0) {
            $this->protocolError('the server masked a frame');
        }
        $length = $second & 0x7F;
        if ($length === 126) {
            $length = unpack('n', $this->read(2, 'a frame length'))[1];
        } elseif ($length === 127) {
            $length = unpack('J', $this->read(8, 'a frame length'))[1];
            if ($length < 0) { // the most significant bit must be 0
                $this->protocolError('a frame length does not fit in 63 bits');
            }
        }
        if ($opcode >= 0x8 && (!$fin || $length > 125)) {
            $this->protocolError('a control frame is fragmented or longer than 125 bytes');
        }
        if ($length > $this->maxMessageSize) {
            $this->protocolError("a message is larger than {$this->maxMessageSize} bytes", 1009);
        }
        return [$fin, $opcode, $length === 0 ? '' : $this->read($length, 'a message')];
    }

    private function closedByServer(string $payload): never
    {
        $code = strlen($payload) >= 2 ? unpack('n', $payload)[1] : null;
        $reason = strlen($payload) > 2 ? ': ' . substr($payload, 2) : '';
        try {
            // Answer the close (echoing its code), as RFC 6455 asks.
            $this->sendFrame(self::OP_CLOSE, $code === null ? '' : pack('n', $code));
        } catch (JobsUnavailable) {
        }
        $this->abort();
        $what = match ($code) {
            null => 'without a code',
            1001 => 'with code 1001 (the jobs service is going away)',
            1009 => 'with code 1009 (a message was too big for it)',
            default => "with code $code",
        };
        $this->fail("the jobs service at {$this->display} closed the connection $what$reason");
    }

    private function protocolError(string $what, int $closeCode = 1002): never
    {
        try {
            $this->sendFrame(self::OP_CLOSE, pack('n', $closeCode));
        } catch (JobsUnavailable) {
        }
        $this->abort();
        $this->fail("WebSocket protocol error from {$this->display}: $what");
    }

    // -- bytes -----------------------------------------------------------------

    /** Exactly $length bytes from the stream (or what the buffer holds). */
    private function read(int $length, string $what): string
    {
        $this->fill($length, $what);
        $data = substr($this->buffer, 0, $length);
        $this->buffer = (string) substr($this->buffer, $length);
        return $data;
    }

    /** Read until the buffer holds at least $length bytes. */
    private function fill(int $length, string $what): void
    {
        $this->ensureOpen();
        while (strlen($this->buffer) < $length) {
            $chunk = fread($this->stream, max(65536, min($length - strlen($this->buffer), 1 << 20)));
            if ($chunk !== false && $chunk !== '') {
                $this->buffer .= $chunk;
                continue;
            }
            $meta = stream_get_meta_data($this->stream);
            if ($meta['timed_out']) {
                $this->abort();
                $this->fail("timed out waiting for $what from {$this->display}");
            }
            if (feof($this->stream)) {
                $this->abort();
                $this->fail("lost the connection to {$this->display} (it closed without a close frame)");
            }
            // Otherwise the read was interrupted (a signal): try again.
        }
    }

    private function write(string $data): void
    {
        $this->ensureOpen();
        while ($data !== '') {
            $written = @fwrite($this->stream, $data);
            if ($written === false || $written === 0) {
                $timedOut = stream_get_meta_data($this->stream)['timed_out'];
                $this->abort();
                $this->fail($timedOut
                    ? "timed out sending to {$this->display}"
                    : "lost the connection to {$this->display} while sending");
            }
            $data = (string) substr($data, $written);
        }
    }

    private function ensureOpen(): void
    {
        if ($this->stream === null) {
            throw new JobsUnavailable($this->failure ?? "the connection to {$this->display} is closed");
        }
    }

    private function fail(string $message): never
    {
        $this->failure ??= $message;
        throw new JobsUnavailable($message);
    }

    /** Disconnect at once. */
    private function abort(): void
    {
        if ($this->stream !== null) {
            @fclose($this->stream);
            $this->stream = null;
        }
    }
}

/**
 * JSON-RPC 2.0 calls to trismtp's jobs service, one at a time, over one WebSocket.
 */
final class JobsClient
{
    private int $nextId = 1;

    public function __construct(private readonly WebSocket $ws)
    {
    }

    /**
     * Connect to the jobs service at $url (default ws://127.0.0.1:6001/rpc).
     * A non-empty $token is sent as "Authorization: Bearer <token>" (jobs_service.token).
     * $timeout bounds the connection and the wait for each reply, in seconds.
     */
    public static function connect(string $url, string $token = '', float $timeout = 30.0): self
    {
        $headers = $token !== '' ? ['Authorization' => "Bearer $token"] : [];
        return new self(WebSocket::connect($url, $headers, $timeout));
    }

    /**
     * Call $method with $params and return the reply's "result".
     *
     * @throws RpcError the service answered with an error object
     * @throws JobsUnavailable no connection, or it was lost before the reply
     */
    public function call(string $method, array $params = []): array
    {
        $id = $this->nextId++;
        $request = json_encode(
            ['jsonrpc' => '2.0', 'id' => $id, 'method' => $method, 'params' => (object) $params],
            JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION,
        );
        $this->ws->sendText($request);
        while (true) {
            $text = $this->ws->receive();
            try {
                $reply = json_decode($text, true, 512, JSON_THROW_ON_ERROR | JSON_BIGINT_AS_STRING);
            } catch (\JsonException $e) {
                $this->ws->close(1002, 'invalid JSON-RPC reply');
                throw new JobsUnavailable('the jobs service sent a reply that is not JSON: ' . $e->getMessage());
            }
            if (!is_array($reply) || ($reply['jsonrpc'] ?? null) !== '2.0') {
                $this->ws->close(1002, 'invalid JSON-RPC reply');
                throw new JobsUnavailable('the jobs service sent something that is not a JSON-RPC 2.0 response');
            }
            $replyId = $reply['id'] ?? null;
            if ($replyId !== $id && $replyId !== null) {
                continue; // not ours: one call at a time, so this cannot happen with trismtp
            }
            if (isset($reply['error'])) {
                $error = is_array($reply['error']) ? $reply['error'] : [];
                $class = ((int) ($error['code'] ?? 0)) === -32006 ? LeaseLost::class : RpcError::class;
                throw new $class(
                    (string) ($error['message'] ?? 'no message'),
                    (int) ($error['code'] ?? 0),
                    $error['data'] ?? null,
                );
            }
            if ($replyId === null || !array_key_exists('result', $reply) || !is_array($reply['result'])) {
                $this->ws->close(1002, 'invalid JSON-RPC reply');
                throw new JobsUnavailable('the jobs service sent a response without a result object');
            }
            return $reply['result'];
        }
    }

    /**
     * Lease up to $max ready jobs of $pipeline for $lease seconds (docs/rpc.md#jobsreserve).
     * Returns at once, with [] when nothing is ready: poll. Each job carries its
     * lease: ['token' => string, 'attempt' => int (1 on the first delivery), 'expires_at' => float].
     *
     * @return list<array{job: string, id: string, payload: string, headers: array, options: array, lease: array}>
     */
    public function reserve(string $pipeline, int $max, float $lease): array
    {
        return $this->call('jobs.Reserve', ['pipeline' => $pipeline, 'max' => $max, 'lease' => $lease])['jobs'];
    }

    /**
     * The jobs (as reserve() returned them) are done: delete them. Returns how many.
     * Throws LeaseLost for jobs whose lease is no longer yours (the others are acked).
     */
    public function ack(array $jobs): int
    {
        return $this->call('jobs.Ack', ['jobs' => self::leases($jobs)])['acked'];
    }

    /**
     * Give the jobs back: handed out again after $delay seconds (or deleted, without
     * $requeue). Returns how many; throws LeaseLost like ack().
     */
    public function nack(array $jobs, bool $requeue = true, float $delay = 0.0): int
    {
        return $this->call('jobs.Nack', ['jobs' => self::leases($jobs), 'requeue' => $requeue, 'delay' => $delay])['nacked'];
    }

    /** Keep the jobs for $lease more seconds from now (a slow job). Throws LeaseLost like ack(). */
    public function extend(array $jobs, float $lease): int
    {
        return $this->call('jobs.Extend', ['jobs' => self::leases($jobs), 'lease' => $lease])['extended'];
    }

    /** [{id, token}] of jobs as reserve() returned them. */
    private static function leases(array $jobs): array
    {
        return array_map(
            static fn (array $job): array => ['id' => $job['id'], 'token' => $job['lease']['token']],
            array_values($jobs),
        );
    }

    /** Close the connection (the WebSocket close handshake). */
    public function close(): void
    {
        $this->ws->close();
    }
}
