/* A qemu TCG plugin counting executed guest instructions by form: mnemonic, "/v" for an
 * Advanced SIMD operand, "/N" for a register list of N registers (TBL tables, LD1 / ST1
 * lists). Debian's qemu-user runs plugins (-plugin) but ships none, so this is a small
 * instruction counter in the manner of qemu's contrib insn plugin, written against qemu's
 * plugin API version 1 (qemu 4.2 .. 8.x), whose few declarations are repeated below so that it
 * builds without qemu's source tree. Counting is inline (no callback per instruction) and
 * assumes one guest thread (the benchmark runs its kernels serially).
 *
 *   gcc -O2 -shared -fPIC -o insn_mix.so insn_mix_plugin.c
 *   qemu-aarch64 -plugin ./insn_mix.so -d plugin -D counts.txt ./program
 * counts.txt: one "count form" line per instruction form, then "total N".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op,
                                                void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                           void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void *), void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_FORMS 8192
static char forms[MAX_FORMS][40];
static uint64_t counts[MAX_FORMS];
static int n_forms;

/* "tbl v0.16b, {v1.16b, v2.16b}, v3.16b" -> "tbl/v/2"; "add x0, x1, x2" -> "add". */
static int form_of(const char *disas) {
  char key[40];
  int len = 0;
  while (disas[len] && disas[len] != ' ' && len < 20) ++len;
  memcpy(key, disas, len);
  key[len] = 0;
  const char *ops = disas + len;
  int vector = 0;
  for (const char *p = ops; *p; ++p)
    if ((*p == 'v' || *p == 'q') && p[1] >= '0' && p[1] <= '9' && (p == ops || p[-1] == ' ' || p[-1] == '{')) vector = 1;
  if (vector) strcat(key, "/v");
  const char *open = strchr(ops, '{');
  if (open) {
    const char *close = strchr(open, '}');
    int regs = 1;
    const char *dash = NULL;
    for (const char *p = open; close && p < close; ++p) {
      if (*p == ',') ++regs;
      if (*p == '-') dash = p;
    }
    if (dash) { /* {v0.16b-v3.16b} */
      int a = atoi(open + 2), b = atoi(dash + 2);
      regs = b - a + 1;
      if (regs <= 0) regs += 32;
    }
    char n[8];
    snprintf(n, sizeof n, "/%d", regs);
    strcat(key, n);
  }
  for (int i = 0; i < n_forms; ++i)
    if (strcmp(forms[i], key) == 0) return i;
  if (n_forms == MAX_FORMS) return MAX_FORMS - 1;
  strcpy(forms[n_forms], key);
  return n_forms++;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  const size_t n = qemu_plugin_tb_n_insns(tb);
  for (size_t i = 0; i < n; ++i) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    char *disas = qemu_plugin_insn_disas(insn);
    const int f = form_of(disas ? disas : "?");
    free(disas);
    qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &counts[f], 1);
  }
}

static void on_exit_(qemu_plugin_id_t id, void *userdata) {
  (void)id;
  (void)userdata;
  char line[96];
  uint64_t total = 0;
  for (int i = 0; i < n_forms; ++i) {
    if (!counts[i]) continue;
    snprintf(line, sizeof line, "%llu %s\n", (unsigned long long)counts[i], forms[i]);
    qemu_plugin_outs(line);
    total += counts[i];
  }
  snprintf(line, sizeof line, "total %llu\n", (unsigned long long)total);
  qemu_plugin_outs(line);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv) {
  (void)info;
  (void)argc;
  (void)argv;
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, on_exit_, NULL);
  return 0;
}
