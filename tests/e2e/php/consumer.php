<?php

/**
 * A job consumer written the way Buggregator 1.x's SMTP job handler is
 * (app/modules/Smtp/Interfaces/Jobs/EmailHandler.php and its Message and
 * Attachment classes): strict types, and the seed's payload contract as
 * typed properties. A payload that breaks the contract (a null filename,
 * a missing raw, no headers['Subject'][0], content that is not base64)
 * throws here exactly as it would there.
 *
 * Reads one job per line on stdin, the RoadRunner Job as JSON ({"job",
 * "id", "payload", "headers", "options"}); stores each attachment as
 * Buggregator does, as OUT_DIR/<job id>/<filename>; prints one JSON line per
 * job with what the handler saw. Exit status 1 and the error on stderr if
 * any job fails.
 *
 * Usage: php consumer.php OUT_DIR < jobs.jsonl
 *
 * Written for trismtp's tests; no code is taken from Buggregator.
 */

declare(strict_types=1);

final readonly class Attachment
{
    // Buggregator takes ?string but promises string from getFilename().
    public function __construct(
        private ?string $filename,
        private string $content,
        private string $type,
        private ?string $contentId = null,
    ) {}

    public function getFilename(): string
    {
        return $this->filename;
    }

    public function getContent(): string
    {
        return $this->content;
    }

    public function getType(): string
    {
        return $this->type;
    }

    public function getContentId(): ?string
    {
        return $this->contentId;
    }
}

final readonly class Message
{
    /** @param Attachment[] $attachments */
    public function __construct(
        public ?string $id,
        public string $raw,
        public array $sender,
        public array $recipients,
        public array $ccs,
        public string $subject,
        public string $htmlBody,
        public string $textBody,
        public array $replyTo,
        public array $allRecipients,
        public array $attachments,
    ) {}
}

function handle(array $job, string $outDir): array
{
    $data = json_decode($job['payload'], true, 512, JSON_THROW_ON_ERROR);
    $attachments = array_map(
        static function (array $a): Attachment {
            $bytes = base64_decode($a['content'], true);
            if ($bytes === false) {
                throw new UnexpectedValueException('attachment content is not base64');
            }
            return new Attachment(
                filename: $a['filename'],
                content: $bytes,
                type: $a['content_type'] ?? 'application/octet-stream',
                contentId: $a['content_id'] ?? null,
            );
        },
        $data['attachments'],
    );
    $message = new Message(
        id: $data['message']['id'],
        raw: $data['message']['raw'],
        sender: $data['envelope']['from'],
        recipients: $data['envelope']['to'],
        ccs: $data['envelope']['ccs'],
        subject: $data['message']['headers']['Subject'][0],
        htmlBody: $data['message']['html_body'],
        textBody: $data['message']['body'],
        replyTo: $data['envelope']['replyTo'],
        allRecipients: $data['envelope']['allRecipients'],
        attachments: $attachments,
    );

    $dir = $outDir . '/' . $job['id'];
    if (!is_dir($dir) && !mkdir($dir, 0700, true)) {
        throw new RuntimeException("cannot create $dir");
    }
    $stored = [];
    foreach ($message->attachments as $attachment) {
        $path = $dir . '/' . $attachment->getFilename();
        if (file_put_contents($path, $attachment->getContent()) === false) {
            throw new RuntimeException("cannot write $path");
        }
        $stored[] = [
            'filename' => $attachment->getFilename(),
            'type' => $attachment->getType(),
            'content_id' => $attachment->getContentId(),
            'size' => strlen($attachment->getContent()),
        ];
    }

    return [
        'id' => $job['id'],
        'subject' => $message->subject,
        'message_id' => $message->id,
        'raw_length' => strlen($message->raw),
        'raw_is_utf8' => preg_match('//u', $message->raw) === 1,
        'text' => $message->textBody,
        'html' => $message->htmlBody,
        'from' => $message->sender,
        'attachments' => $stored,
    ];
}

set_error_handler(static function (int $severity, string $text, string $file, int $line): bool {
    throw new ErrorException($text, 0, $severity, $file, $line);
});

if ($argc !== 2) {
    fwrite(STDERR, "usage: php consumer.php OUT_DIR < jobs.jsonl\n");
    exit(2);
}

$failed = false;
while (($line = fgets(STDIN)) !== false) {
    if (trim($line) === '') {
        continue;
    }
    $job = json_decode($line, true, 512, JSON_THROW_ON_ERROR);
    try {
        echo json_encode(handle($job, $argv[1]), JSON_THROW_ON_ERROR | JSON_UNESCAPED_UNICODE), "\n";
    } catch (Throwable $e) {
        fwrite(STDERR, sprintf("job %s: %s: %s\n", $job['id'] ?? '?', $e::class, $e->getMessage()));
        $failed = true;
    }
}
exit($failed ? 1 : 0);
