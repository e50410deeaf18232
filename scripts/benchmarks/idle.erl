%% idle: memory per idle process blocked in receive.
%% The Erlang twin of idle.lua; see BENCHMARKS.md.
%%
%% Args (key=value): n (processes), batch (spawned before waiting for their
%% ready messages), sample (how many processes process_info is asked about).
%% Figures, each per process, in KB (1024 bytes):
%%   idle_rss    growth of the OS resident set (VmRSS of the beam process);
%%   idle_alloc  process_info(P, memory), averaged over a sample;
%%   idle_procmem growth of erlang:memory(processes).
-module(idle).
-export([main/0, main/1]).

main() -> main([]).

main(Args) ->
    N = arg(Args, "n", 100000),
    B = arg(Args, "batch", 1000),
    S = arg(Args, "sample", 1000),
    garbage_collect(),
    Rss0 = rss_kb(),
    Mem0 = erlang:memory(processes),
    T0 = erlang:monotonic_time(millisecond),
    Step = max(1, N div S),
    {Count, Sample} = spawn_batches(N, B, Step, self(), {0, []}),
    T1 = erlang:monotonic_time(millisecond),
    garbage_collect(),
    Mem1 = erlang:memory(processes),
    Rss1 = rss_kb(),
    Alloc = lists:sum([element(2, process_info(P, memory)) || P <- Sample]) / length(Sample),
    io:format("detail n=~b spawned and all waiting in ~b ms; VmRSS ~b -> ~b KB; "
              "erlang:memory(processes) ~b -> ~b bytes; process_info sample=~b~n",
              [N, T1 - T0, Rss0, Rss1, Mem0, Mem1, length(Sample)]),
    io:format("RESULT name=idle_rss value=~.3f unit=KB~n", [(Rss1 - Rss0) / N]),
    io:format("RESULT name=idle_alloc value=~.3f unit=KB~n", [Alloc / 1024]),
    io:format("RESULT name=idle_procmem value=~.3f unit=KB~n", [(Mem1 - Mem0) / N / 1024]),
    io:format("RESULT name=idle_count value=~b unit=procs~n", [Count]),
    erlang:halt(0).

%% Spawns N processes that say they are ready, then block in receive; waits
%% for each batch's ready messages so that the parent's mailbox stays small.
%% Keeps only every Step-th pid (the sample), as idle.lua does, so that the
%% parent's own list does not count as per-process memory.
spawn_batches(0, _, _, _, Acc) -> Acc;
spawn_batches(N, B, Step, Parent, Acc) ->
    K = min(N, B),
    Acc1 = spawn_n(K, Step, Parent, Acc),
    wait(K),
    spawn_batches(N - K, B, Step, Parent, Acc1).

spawn_n(0, _, _, Acc) -> Acc;
spawn_n(K, Step, Parent, {Count, Sample}) ->
    P = spawn(fun() -> Parent ! ready, receive stop -> ok end end),
    Sample1 = case (Count + 1) rem Step of 0 -> [P | Sample]; _ -> Sample end,
    spawn_n(K - 1, Step, Parent, {Count + 1, Sample1}).

wait(0) -> ok;
wait(I) -> receive ready -> wait(I - 1) end.

rss_kb() ->
    {ok, Bin} = file:read_file("/proc/self/status"),
    [Line] = [L || L <- string:split(binary_to_list(Bin), "\n", all),
                   lists:prefix("VmRSS:", L)],
    [_, Kb | _] = string:lexemes(Line, " \t"),
    list_to_integer(Kb).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
