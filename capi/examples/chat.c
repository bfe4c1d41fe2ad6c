/*
 * tandem's C interface end to end: load a model on the device "auto"
 * chooses (and say which, and why when it is not CUDA), prefill a prompt with a
 * progress callback, generate with a token callback, save the session,
 * restore it into a second session and continue both the same way, cancel a
 * generation from another thread, and report errors.
 *
 *   cc chat.c -I ../include -L ../../target/release -ltandem -lpthread -o chat
 *   ./chat MODEL.gguf SESSION_FILE
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "tandem.h"

#define CHECK(call)                                                          \
  do {                                                                       \
    TandemStatus status_ = (call);                                           \
    if (status_ != TANDEM_OK) {                                              \
      fprintf(stderr, "%s: status %d: %s\n", #call, (int)status_,            \
              tandem_last_error_message());                                  \
      return 1;                                                              \
    }                                                                        \
  } while (0)

static const char *PROMPT =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n";
static const char *FOLLOW_UP =
    "\n<|im_start|>user\nAnd what is the capital of Italy?<|im_end|>\n"
    "<|im_start|>assistant\n";
static const char *STORY =
    "\n<|im_start|>user\nWrite a very long story about a dragon.<|im_end|>\n"
    "<|im_start|>assistant\n";

typedef struct {
  char text[8192];
  size_t len;
  atomic_int tokens;
} Reply;

static void on_progress(size_t done, size_t total, void *user_data) {
  (void)user_data;
  printf("prefill %zu/%zu\n", done, total);
}

static int on_token(const char *text, size_t len, void *user_data) {
  Reply *reply = user_data;
  if (reply->len + len < sizeof reply->text) {
    memcpy(reply->text + reply->len, text, len);
    reply->len += len;
    reply->text[reply->len] = '\0';
  }
  atomic_fetch_add(&reply->tokens, 1);
  return 0;
}

/* Prefills `prompt` and generates up to `max_tokens` greedily into `reply`. */
static int ask(TandemSession *session, const char *prompt, size_t max_tokens,
               Reply *reply) {
  memset(reply, 0, sizeof *reply);
  CHECK(tandem_session_prefill(session, prompt, on_progress, NULL));
  CHECK(tandem_session_generate(session, max_tokens, 0.0f, 0, on_token, reply));
  return 0;
}

typedef struct {
  TandemSession *session;
  Reply reply;
  TandemStatus status;
} Job;

static void *generate_story(void *arg) {
  Job *job = arg;
  job->status = tandem_session_generate(job->session, 400, 0.0f, 0, on_token,
                                        &job->reply);
  return NULL;
}

/* Starts a long generation on a second thread and cancels it from this one. */
static int cancel_from_another_thread(TandemSession *session) {
  static Job job;
  memset(&job, 0, sizeof job);
  job.session = session;
  CHECK(tandem_session_prefill(session, STORY, NULL, NULL));
  pthread_t thread;
  if (pthread_create(&thread, NULL, generate_story, &job) != 0) {
    fprintf(stderr, "pthread_create failed\n");
    return 1;
  }
  for (int waited = 0; atomic_load(&job.reply.tokens) < 4 && waited < 6000;
       waited++) {
    nanosleep(&(struct timespec){.tv_nsec = 10000000}, NULL);
  }
  CHECK(tandem_session_cancel(session));
  pthread_join(thread, NULL);
  printf("cancelled: status %d after %d tokens\n", (int)job.status,
         atomic_load(&job.reply.tokens));
  return job.status == TANDEM_ERR_CANCELLED ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL SESSION_FILE\n", argv[0]);
    return 2;
  }
  TandemStatus missing = tandem_engine_load("/no/such/model.gguf", NULL, NULL,
                                            &(TandemEngine *){NULL});
  printf("missing model: status %d: %s\n", (int)missing,
         tandem_last_error_message());

  TandemEngine *engine = NULL;
  CHECK(tandem_engine_load(argv[1], "auto", NULL, &engine));
  printf("device: %s\n", tandem_engine_device(engine));
  const char *fallback = tandem_engine_device_fallback(engine);
  if (fallback[0] != '\0') printf("not cuda: %s\n", fallback);
  TandemSession *first = NULL;
  CHECK(tandem_session_new(engine, &first));
  static Reply reply, again;
  if (ask(first, PROMPT, 32, &reply) != 0) return 1;
  printf("reply: %s\n", reply.text);

  size_t saved = 0;
  CHECK(tandem_session_save(first, argv[2]));
  CHECK(tandem_session_token_count(first, &saved));
  printf("saved %zu tokens\n", saved);
  if (ask(first, FOLLOW_UP, 24, &reply) != 0) return 1;
  printf("follow-up: %s\n", reply.text);

  TandemSession *second = NULL;
  CHECK(tandem_session_new(engine, &second));
  CHECK(tandem_session_restore(second, argv[2], on_progress, NULL));
  size_t restored = 0;
  CHECK(tandem_session_token_count(second, &restored));
  printf("restored %zu tokens\n", restored);
  if (ask(second, FOLLOW_UP, 24, &again) != 0) return 1;
  printf("follow-up after restore: %s\n", again.text);
  printf("same follow-up: %s\n", strcmp(reply.text, again.text) == 0 ? "yes" : "no");

  if (cancel_from_another_thread(second) != 0) return 1;

  TandemStatus busy = tandem_engine_free(engine);
  printf("engine free with live sessions: status %d\n", (int)busy);
  CHECK(tandem_session_free(first));
  CHECK(tandem_session_free(second));
  CHECK(tandem_engine_free(engine));
  printf("done\n");
  return 0;
}
