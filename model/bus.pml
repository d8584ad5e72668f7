/*
 * model/bus.pml: shmd's publish / read / sleep protocol for SPIN.
 *
 * One writer, NR readers, a ring of CAP slots, NREC records.  The steps
 * carry the labels of docs/PROTOCOL.md and of the C that implements them:
 * [P1]-[P6] shmd/_sys/_writer.c (Writer_publish, reserve_to, write_slot,
 * commit, writer_wake), [R1]-[R5] shmd/_sys/_reader.c (Reader_read_batch,
 * publish_cursor), [S1]-[S5] _reader.c (Reader_prepare_sleep; [S5] is the
 * caller's epoll_wait).  model/README.md says what is modelled and what
 * is not.
 *
 * Each atomic step holds one shared load or store of the C (see the note
 * above the Writer), so the model's executions are the C's executions
 * under sequential consistency: the fences are all in place, weaker orders
 * are not checked (docs/PROTOCOL.md argues them).
 *
 *   spin -a [-DPOLICY_BLOCK | -DPOLICY_DROP] [-DBROKEN_NO_RECHECK]
 *           [-DBROKEN_NO_RESERVE_RECHECK] bus.pml
 *   gcc -O2 -DSAFETY -o pan pan.c && ./pan -m20000
 *
 * Properties (assertions and end states; pan reports either as an error):
 *  (a) a reader delivers record s only if the slot it copied held record s
 *      whole (header seq and payload both s: never torn, never a later
 *      lap's); a header mismatch is acceptable only for a record [R4]
 *      drops; every record is delivered exactly once or counted lost;
 *      under the block policy nothing is lost;
 *  (b) no lost wake-up: when nothing in the system can move any more
 *      (SPIN's `timeout`), a reader asleep in [S5] with nothing in its
 *      eventfd has read every committed record and the writer is still
 *      active; and no process is stuck anywhere else (invalid end state),
 *      e.g. a block-policy writer in [P1] for a reader that sleeps.
 */

#define CAP 2           /* ring capacity (slots; CLEAR_LOCALS below assumes 2) */
#ifndef NREC
#define NREC 3          /* records the writer publishes (NREC > CAP: it laps) */
#endif
#define NR 2            /* readers */

#if !defined(POLICY_BLOCK) && !defined(POLICY_DROP)
#define POLICY_DROP
#endif

#define NONE 255        /* a slot never written */

/* The segment's header (docs/PROTOCOL.md "Header"). */
byte write_seq = 0;     /* records with seq < write_seq are committed */
byte reserve_seq = 0;   /* the writer may be writing seqs in [write_seq, reserve_seq) */
/* sleep_count: every announcement increments it ([S3]); the writer loads
 * it in [P5] and compares it with sleep_seen, the value of its previous
 * load, which it keeps (a local).  Only "sleep_count != sleep_seen" is ever
 * used, and the writer makes it false at its load (sleep_seen = what it
 * loaded), so the model keeps that one bit, `announced`: readers set it
 * where they increment sleep_count, the writer's load reads and clears it
 * in one step (its sleep_seen store is a local).  The same comparisons,
 * without the counter's history multiplying the states. */
bit announced = 0;      /* sleep_count != the writer's sleep_seen */
bit is_active = 1;      /* the header's `active` (a Promela keyword) */

/* The ring: each slot's header seq and its payload, which here is the seq
 * again, so that a copy mixing two records shows as payload != seq. */
byte slot_seq[CAP];
byte slot_data[CAP];

/* The reader table: each reader's entry, and its eventfd's counter. */
byte cursor[NR];        /* [R5] stores it; the block policy's writer loads it */
/* sleep_seq and wake_seq are u32s mod 2^32 in the C, compared only for
 * equality, and sleep_seq - wake_seq is always 0 or 1 (a reader announces
 * only when they are equal, the writer answers by copying): mod 2 is the
 * same comparison. */
bit sleep_seq[NR];      /* the reader's word */
bit wake_seq[NR];       /* the writer's word */
/* The eventfd: writes add 1, a read empties it, epoll_wait returns while it
 * is not 0; those see only "0 or not", so a bit is the same counter. */
bit efd[NR];
/* The entry's `delivered` and `lost` counters are statistics nobody else
 * reads; they are not kept (their history would multiply the states).
 * What they count is checked per pass instead: a pass partitions
 * [cursor, stop) into the lost [cursor, cut) and the delivered [cut, stop),
 * the next pass starts at stop, so with cursor <= start <= cut <= stop every
 * record below the final cursor (= NREC) is delivered once or counted lost
 * once. */

/* Each atomic step below holds exactly one load or store of a shared word
 * (or, in [P3], the writer's slot stores, which no reader can tell apart
 * from one step: a copy tears between the reader's own two loads), and
 * then whatever the process does with its own locals before its next
 * shared access: the interleavings of the C's shared accesses, without
 * the intermediate states of local computation. */

proctype Writer()
{
    byte seq = 0;           /* Writer.seq: the next seq */
    bit moved;              /* [P5]: sleep_count != sleep_seen */
    bit sleep_seen_valid = 0;   /* Writer.sleep_seen_valid */
    byte r = 0;
    bit asked;              /* sleep_seq[r] as loaded */
    byte pending = 0;       /* [P5]: 1 wake_seq[r] to store, 2 eventfd to write */

next:
    if
    :: seq >= NREC -> goto last
    :: else -> skip
    fi;
    /* Writer_publish: one record. */
#ifdef POLICY_BLOCK
P1_room:
    /* [P1] block policy: wait until write_seq + n - min(cursor) <= capacity
     * (shmd.bus.block.wait_for_space re-checks the cursors at least every
     * 10 ms, so it is a wait for this condition). */
    (seq + 1 - cursor[0] <= CAP && seq + 1 - cursor[1] <= CAP);
#endif
P2_reserve:
    /* [P2] reserve_to: reserve_seq = write_seq + n (relaxed; never lowered,
     * and one writer only raises it), then a release fence (SC here). */
    reserve_seq = seq + 1;
P3_write_slot:
    /* [P3] write_slot: the header's seq, then the payload. */
    d_step { slot_seq[seq % CAP] = seq; slot_data[seq % CAP] = seq };
P4_commit:
    /* [P4] commit: store write_seq (release). */
    write_seq = seq + 1;
P5_wake:
    /* [P5] writer_wake: full fence (SC here), load sleep_count (acquire). */
    atomic {
        seq++;
        moved = announced;
        announced = 0;                  /* sleep_seen = count */
        if
        :: sleep_seen_valid && !moved ->
            goto next                   /* nobody announced since our last look */
        :: else ->
            sleep_seen_valid = 1;
            moved = 0
        fi
    };
    do
    :: atomic { r < NR && pending == 0 ->
            asked = sleep_seq[r];       /* relaxed, after the acquire */
            if
            :: asked != wake_seq[r] -> pending = 1  /* wake_seq: our own word */
            :: else -> asked = 0; r++
            fi }
    :: atomic { pending == 1 -> wake_seq[r] = asked; pending = 2 }  /* release: answers it */
    :: atomic { pending == 2 -> efd[r] = 1; pending = 0; asked = 0; r++ }  /* write_eventfd */
    :: atomic { r >= NR && pending == 0 -> r = 0; goto next }
    od;
    /* [P6] bytes_published: statistics, not modelled. */

last:
    /* After the last record the writer either shuts down or stays up
     * publishing nothing more (an idle bus, where a lost wake-up is never
     * repaired by a later commit). */
    if
    :: skip
    :: /* Publisher.deactivate: active = 0, fence, answer every reader and
        * write every eventfd, asleep or not. */
        is_active = 0;
        do
        :: r < NR ->
            wake_seq[r] = sleep_seq[r];
            efd[r] = 1;
            r++
        :: else -> break
        od
    fi
}

/* A reader's locals back to 0 between passes, so that values left from
 * the last pass do not multiply the states. */
#define CLEAR_LOCALS \
    w = 0; res = 0; again = 0; start = 0; stop = 0; cut = 0; s = 0; n = 0; \
    ok[0] = 0; ok[1] = 0; val[0] = 0; val[1] = 0

proctype Reader(byte r)
{
    byte w, res, again;     /* write_seq and reserve_seq as loaded */
    byte start, stop, cut, s, n;
    bit ok[CAP];            /* [R3]: the slot's header seq was the expected one */
    byte val[CAP];          /* [R3]: the payload copied */
    bit half = 0;           /* [R3]: header loaded, payload not yet */
    bit draining = 0;       /* saw is_active = 0: drain up to write_seq, then leave */

read:
    /* Reader_read_batch */
R1_load:
    /* [R1] write_seq (acquire), then reserve_seq (relaxed). */
    atomic {
        w = write_seq;
        if
        :: w <= cursor[r] -> w = 0; goto nothing_new
        :: else -> skip
        fi
    };
    atomic {
        res = reserve_seq;
R2_plan:
        /* [R2] start = max(cursor, R - capacity); lost = start - cursor
         * (cursor[r] is our own word). */
        start = cursor[r];
        if
        :: res > CAP && res - CAP > start ->
            n = res - CAP - start;
            start = res - CAP
        :: else -> skip
        fi;
        if
        :: w > start -> stop = w
        :: else -> stop = start
        fi;
        s = start
    };
R3_copy:
    /* [R3] copy [start, stop): per record the header's seq, then the
     * payload, each one load. */
    do
    :: atomic { s < stop && !half ->
            ok[s - start] = (slot_seq[s % CAP] == s);
            if
            :: ok[s - start] -> half = 1
            :: else -> s++      /* the writer lapping us, settled by [R4] */
            fi }
    :: atomic { half -> val[s - start] = slot_data[s % CAP]; half = 0; s++ }
    :: atomic { s >= stop && !half -> break }
    od;
R4_recheck:
    /* [R4] acquire fence (SC here), re-read reserve_seq; positions below
     * R' - capacity may have been overwritten while we copied: drop them
     * by position and count them lost. */
    atomic {
#ifdef BROKEN_NO_RESERVE_RECHECK
        again = res;        /* BROKEN: trusts the reserve_seq of [R1] */
#else
        again = reserve_seq;
#endif
        cut = start;
        if
        :: again > CAP && again - CAP > start ->
            if
            :: again - CAP < stop -> cut = again - CAP
            :: else -> cut = stop
            fi
        :: else -> skip
        fi;
        n = n + cut - start;
        /* (a) [cursor, cut) lost, [cut, stop) delivered: a partition. */
        assert(cursor[r] <= start && start <= cut && cut <= stop);
        /* Deliver [cut, stop). */
        s = cut;
        do
        :: s < stop ->
            /* (a) a kept position's header was right (else the C reports
             * the segment corrupt), and its payload is that record's: not
             * torn, not a later lap's. */
            assert(ok[s - start]);
            assert(val[s - start] == s);
            s++
        :: else -> break
        od;
#ifdef POLICY_BLOCK
        assert(n == 0);     /* (a) the block policy loses nothing */
#endif
        skip                /* lost += n, delivered += stop - cut */
#ifdef POLICY_BLOCK
    };
R5_cursor:
    /* [R5] publish_cursor: store cursor (release), which the writer's
     * [P1] loads. */
    atomic {
#else
        ;
        /* [R5] publish_cursor: store cursor (release); under drop-oldest no
         * other process loads it, so it is part of this step. */
#endif
        cursor[r] = stop;
        CLEAR_LOCALS;
        goto read
    };

nothing_new:
    /* Reader_prepare_sleep */
S1_check:
    /* [S1] write_seq > cursor or active = 0 (both acquire): do not sleep. */
    atomic {
        if
        :: draining -> goto done    /* drained after active = 0: leave */
        :: else -> skip
        fi;
        if
        :: write_seq > cursor[r] -> goto read
        :: else -> skip
        fi
    };
    atomic {
        if
        :: !is_active -> draining = 1; goto read
        :: else -> skip
        fi
    };
S2_drain:
    /* [S2] read the eventfd (non-blocking): drop answered wake-ups. */
    efd[r] = 0;
S3_announce:
    /* [S3] if sleep_seq = wake_seq (acquire): sleep_seq + 1 (relaxed),
     * then sleep_count + 1 (fetch-and-add, release). */
    if
    :: sleep_seq[r] == wake_seq[r] ->
        sleep_seq[r] = 1 - sleep_seq[r];    /* + 1 */
        announced = 1                       /* sleep_count + 1 */
    :: else -> skip         /* an earlier announcement stands */
    fi;
S4_recheck:
    /* [S4] full fence (SC here), reload write_seq and active (acquire). */
#ifndef BROKEN_NO_RECHECK
    if
    :: write_seq > cursor[r] -> goto read
    :: else -> skip
    fi;
    atomic {
        if
        :: !is_active -> draining = 1; goto read
        :: else -> skip
        fi
    };
#endif
S5_sleep:
    /* [S5] epoll_wait on the eventfd. */
    if
    :: efd[r] -> goto read
    :: timeout ->
        /* (b) nothing in the system can move and nobody will write our
         * eventfd: we must have read every committed record, and the
         * writer must still be up (its shutdown wakes everyone). */
        assert(write_seq == cursor[r]);
        assert(is_active);
        goto done
    fi;

done:
    /* (a) every record delivered exactly once or counted lost: the passes
     * partitioned [0, NREC). */
    assert(cursor[r] == write_seq && write_seq == NREC)
}

init
{
    byte i;
    for (i : 0 .. CAP - 1) {
        slot_seq[i] = NONE;
        slot_data[i] = NONE
    }
    atomic {
        run Writer();
        run Reader(0);
        run Reader(1)
    }
}
