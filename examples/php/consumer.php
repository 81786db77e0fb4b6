<?php

/**
 * A worker that takes trismtp's email jobs from the jobs service and processes them.
 *
 * PHP 8.1 or newer, no Composer packages: the client is JobsClient.php next to
 * this file (a WebSocket + JSON-RPC client in plain PHP). Run it next to `make run`:
 *
 *     php examples/php/consumer.php
 *     php examples/php/consumer.php --url ws://127.0.0.1:6001/rpc --pipeline smtp --max 10
 *     TRISMTP_JOBS_TOKEN=secret php examples/php/consumer.php
 *
 * The loop:
 * 1. jobs.Reserve leases up to --batch jobs for --lease seconds. A job neither
 *    acked nor nacked within its lease is handed out again: choose a lease
 *    longer than your slowest job.
 * 2. For each job, json_decode($job['payload'], true) (the payload is JSON
 *    *text*: decode it a second time) and handle() it: here, print one line.
 * 3. jobs.Ack when handle() returns; when it throws, log the error and
 *    jobs.Nack with requeue: the job is handed out again after --retry-delay s.
 * 4. jobs.Reserve returns at once, with [] when the pipeline is empty, so the
 *    worker polls, waiting a little longer each time it finds nothing (up to --idle s).
 * 5. It stops after --max jobs (acked or failed), or on Ctrl-C / SIGTERM
 *    (with the pcntl extension): it finishes the job in hand, gives back at
 *    once the jobs it reserved but did not start, and exits 0. A second
 *    Ctrl-C quits at once (exit status 1); the jobs in hand come back after
 *    their lease.
 *
 * Exit status: 0 after --max jobs or a stop; 1 when the jobs service cannot be
 * reached, refuses the token or answers with an error (or after a second
 * Ctrl-C); 2 for invalid arguments.
 *
 * Coming from the RoadRunner SMTP plugin (spiral/roadrunner-jobs)?
 * - There is no RoadRunner worker loop: nothing starts this script for you, and
 *   no `$consumer->waitTask()` pushes tasks to it. You run it yourself (systemd,
 *   supervisord, a container) as many times as you want workers, and it *pulls*:
 *   jobs.Reserve, then Ack/Nack.
 * - `$task->getPayload()` is `$job['payload']`, the same JSON: the code that
 *   handles one email (json_decode and what follows) can stay as it is.
 *   `$task->getId()` is `$job['id']`, `getHeaders()` is `$job['headers']`,
 *   `getName()` is `$job['job']`, the pipeline is `$job['options']['pipeline']`.
 * - `$task->ack()` is `$client->ack([$job])`; `$task->nack($e)` / `requeue()` is
 *   `$client->nack([$job], requeue: true, delay: ...)`; `nack(requeue: false)` drops it.
 *   Pass the job as reserve() returned it: its lease token is the proof.
 * - New: the lease. A job you hold longer than --lease seconds is handed out
 *   again, so a crashed worker loses nothing; your late Ack then changes
 *   nothing and throws LeaseLost (logged here). $job['lease']['attempt'] counts
 *   the deliveries; after jobs_service.max_attempts the job goes to the
 *   dead-letter pipeline. Make the handler idempotent on the job id
 *   (trismtp's docs/payload.md#deduplicating).
 * - Payload changes worth knowing: attachments have `content_type` and
 *   `content_id` (not `type`/`contentId`), no `path` (content is inline, base64),
 *   and `message.raw_base64` holds the exact bytes of mail that is not UTF-8
 *   (`message.raw` is a string with U+FFFD there, as in 2.0; docs/payload.md).
 */

declare(strict_types=1);

require_once __DIR__ . '/JobsClient.php';

use Trismtp\Jobs\JobsClient;
use Trismtp\Jobs\JobsUnavailable;
use Trismtp\Jobs\LeaseLost;
use Trismtp\Jobs\RpcError;

const IDLE_FIRST = 0.1; // seconds to wait after the first empty Reserve; doubled up to --idle

/**
 * Process one email (the payload of docs/payload.md). Return to have its job
 * acked; throw to have it retried. Replace the body with your own work.
 *
 * Here: print one line: job id, envelope sender, subject, number of attachments.
 * (To save attachments: base64_decode($a['content']). Never use $a['filename']
 * as a path: it comes from the sender; keep its last component only, as
 * examples/python_worker.py's safe_filename() does.)
 */
function handle(array $email, ?string $failSubject = null): void
{
    $subject = (string) ($email['message']['subject'] ?? '');
    if ($failSubject !== null && $subject === $failSubject) {
        throw new RuntimeException('--fail-subject: refusing the email with subject ' . json($subject));
    }
    $from = (string) ($email['envelope']['mail_from'] ?? '');
    // JSON-quoted, so that a subject cannot break the line (and examples/python_worker.py prints the same).
    printf(
        "job=%s from=%s subject=%s attachments=%d\n",
        $email['uuid'] ?? '',
        json($from !== '' ? $from : '<>'),
        json($subject),
        count($email['attachments'] ?? []),
    );
}

function json(string $text): string
{
    return json_encode($text, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
}

function logLine(string $text): void
{
    fwrite(STDERR, "consumer.php: $text\n");
}

/** Set by the signal handler: reserve no more, finish the job in hand. */
$stopping = false;

function watchSignals(): void
{
    if (!function_exists('pcntl_async_signals')) {
        return; // without pcntl, Ctrl-C ends the process; jobs in hand come back after their lease
    }
    // The handler only sets a flag, which the loop checks between jobs. Note
    // that a signal cuts sleep() and usleep() short, in handle() too.
    pcntl_async_signals(true);
    $handler = function (int $signal): void {
        global $stopping;
        if ($stopping) {
            logLine('quitting at once: jobs in hand come back after their lease');
            exit(1);
        }
        $stopping = true;
        logLine(($signal === SIGTERM ? 'got SIGTERM' : 'got SIGINT') . ': stopping after the current job (again to quit at once)');
    };
    pcntl_signal(SIGINT, $handler);
    pcntl_signal(SIGTERM, $handler);
}

/** Reserve, handle, ack until done. Returns [acked, failed, returned unstarted]. */
function work(JobsClient $client, array $options): array
{
    global $stopping;
    [$acked, $failed, $returned] = [0, 0, 0];
    $idle = IDLE_FIRST;
    while (!$stopping && ($options['max'] === null || $acked + $failed < $options['max'])) {
        $batch = $options['max'] === null ? $options['batch'] : min($options['batch'], $options['max'] - $acked - $failed);
        $jobs = $client->reserve($options['pipeline'], $batch, $options['lease']);
        if ($jobs === []) {
            // Reserve does not wait for jobs: poll, more slowly while idle.
            // (A signal ends the sleep early.)
            usleep((int) ($idle * 1e6));
            $idle = min($idle * 2, $options['idle']);
            continue;
        }
        $idle = IDLE_FIRST;
        foreach ($jobs as $job) {
            if ($stopping) {
                // Reserved but not started: give it back now, not after its lease.
                settle(fn () => $client->nack([$job], requeue: true, delay: 0));
                $returned++;
                continue;
            }
            try {
                $email = json_decode($job['payload'], true, 512, JSON_THROW_ON_ERROR);
                if (!is_array($email)) {
                    throw new UnexpectedValueException('the payload is not a JSON object');
                }
                handle($email, $options['fail-subject']);
            } catch (Throwable $e) {
                logLine(sprintf(
                    'job %s failed: giving it back, to retry in %s s: %s: %s (%s:%d)',
                    $job['id'],
                    $options['retry-delay'],
                    get_class($e),
                    $e->getMessage(),
                    basename($e->getFile()),
                    $e->getLine(),
                ));
                settle(fn () => $client->nack([$job], requeue: true, delay: $options['retry-delay']));
                $failed++;
                continue;
            }
            settle(fn () => $client->ack([$job]));
            $acked++;
        }
    }
    return [$acked, $failed, $returned];
}

/**
 * Ack or Nack; a lost lease is logged, not fatal: the job went to another
 * consumer after our lease ran out (raise --lease if this happens often).
 */
function settle(callable $call): void
{
    try {
        $call();
    } catch (LeaseLost $e) {
        logLine(sprintf('lease lost for job(s) %s: another consumer has them now', implode(', ', $e->staleIds())));
    }
}

const USAGE = <<<'TXT'
usage: php consumer.php [--url URL] [--token TOKEN] [--pipeline NAME] [--batch N]
                        [--lease S] [--retry-delay S] [--idle S] [--max N] [--fail-subject SUBJECT]

  --url URL               the jobs service (default ws://127.0.0.1:6001/rpc)
  --token TOKEN           jobs_service.token (default: $TRISMTP_JOBS_TOKEN; prefer that: argv is public)
  --pipeline NAME         the pipeline (default smtp)
  --batch N               jobs per Reserve (default 10)
  --lease S               seconds to handle a batch before its jobs are handed out again (default 60)
  --retry-delay S         seconds before a failed job is handed out again (default 30)
  --idle S                longest wait between empty Reserves (default 2)
  --max N                 stop after N jobs, acked or failed (default: run until stopped)
  --fail-subject SUBJECT  fail the emails with this subject (a demo of Nack)

TXT;

/** The options, or a string saying what is wrong with them. */
function parseOptions(array $args): array|string
{
    $token = getenv('TRISMTP_JOBS_TOKEN');
    $options = [
        'url' => 'ws://127.0.0.1:6001/rpc',
        'token' => $token === false ? '' : $token,
        'pipeline' => 'smtp',
        'batch' => 10,
        'lease' => 60.0,
        'retry-delay' => 30.0,
        'idle' => 2.0,
        'max' => null,
        'fail-subject' => null,
    ];
    $integers = ['batch', 'max'];
    $floats = ['lease', 'retry-delay', 'idle'];
    for ($i = 0; $i < count($args); $i++) {
        $arg = $args[$i];
        if ($arg === '--help' || $arg === '-h') {
            return '';
        }
        if (!str_starts_with($arg, '--')) {
            return "unexpected argument: $arg";
        }
        [$name, $value] = array_pad(explode('=', substr($arg, 2), 2), 2, null);
        if (!array_key_exists($name, $options)) {
            return "unknown option: --$name";
        }
        if ($value === null) {
            if (!isset($args[$i + 1])) {
                return "--$name needs a value";
            }
            $value = $args[++$i];
        }
        if (in_array($name, $integers, true)) {
            if (!preg_match('/^[0-9]+$/', $value) || (int) $value < 1) {
                return "--$name must be a whole number of at least 1, not '$value'";
            }
            $value = (int) $value;
        } elseif (in_array($name, $floats, true)) {
            if (!is_numeric($value) || (float) $value < 0 || ($name !== 'retry-delay' && (float) $value == 0)) {
                return "--$name must be a number of seconds" . ($name === 'retry-delay' ? ' (0 or more)' : ' (more than 0)') . ", not '$value'";
            }
            $value = (float) $value;
        }
        $options[$name] = $value;
    }
    return $options;
}

function main(array $argv): int
{
    $options = parseOptions(array_slice($argv, 1));
    if (is_string($options)) {
        fwrite($options === '' ? STDOUT : STDERR, ($options === '' ? '' : "consumer.php: $options\n") . USAGE);
        return $options === '' ? 0 : 2;
    }
    watchSignals();
    try {
        $client = JobsClient::connect($options['url'], $options['token']);
        logLine("connected to {$options['url']}: taking jobs from pipeline " . json($options['pipeline']));
        [$acked, $failed, $returned] = work($client, $options);
        $client->close();
    } catch (JobsUnavailable $e) {
        logLine($e->getMessage());
        return 1;
    } catch (RpcError $e) {
        logLine(sprintf('the jobs service answered: %s (JSON-RPC error %d)', $e->getMessage(), $e->getCode()));
        return 1;
    } catch (InvalidArgumentException $e) {
        logLine($e->getMessage());
        return 2;
    }
    logLine("done: $acked acked, $failed failed, $returned returned unstarted");
    return 0;
}

exit(main($argv));
